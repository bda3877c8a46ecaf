"""The engine: builders (the only readers of config dicts), the training loop with its stages,
evaluation and the run directory. It sits on top of every other vfmkd layer."""
