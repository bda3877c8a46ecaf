"""The training loop: trainer, stages, exact resume, torchrun, the run directory and its logs."""
