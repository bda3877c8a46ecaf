"""vfmkd: distill vision foundation models (SAM, ...) into small, fast students."""
from vfmkd.utils.runtime import disable_runtime_installs

__version__ = "0.1.0"

disable_runtime_installs()  # before any entry point imports ultralytics
