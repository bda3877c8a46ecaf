"""vfmkd: distill vision foundation models (SAM, ...) into small, fast students."""

__version__ = "0.1.0"
