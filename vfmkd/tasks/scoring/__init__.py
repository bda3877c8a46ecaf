"""The scorers of the tasks: each accumulates one head's metrics over a split (``update`` per batch,
``result()`` at the end); a task's ``build_scorer`` picks its own. The panoptic metric (PQ of a
merged instance + semantic output) is here too; the scorer that wires it to two heads is the engine's
(:mod:`vfmkd.engine.evaluation.panoptic_quality`)."""
