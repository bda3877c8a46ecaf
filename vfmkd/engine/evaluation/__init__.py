"""Evaluation: the evaluator (task scores + student-teacher fidelity), segmentation / panoptic /
promptable metrics, the tester and its results file."""
