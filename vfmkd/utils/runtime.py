"""Process-wide guards vfmkd sets on import."""
from __future__ import annotations

import os
import sys


def disable_runtime_installs() -> None:
    """vfmkd never installs packages at run time: turn ultralytics' auto-install off, whether
    ultralytics is imported before (its module flags) or after (``YOLO_AUTOINSTALL``) this call.
    (ultralytics patches ``PIL.Image.open`` to pip-install pi-heif on an unidentified image.)"""
    os.environ["YOLO_AUTOINSTALL"] = "False"
    for name in ("ultralytics.utils", "ultralytics.utils.checks"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "AUTOINSTALL"):
            module.AUTOINSTALL = False
