#!/usr/bin/env python
"""Export a trained student to ONNX, TorchScript or (YOLOv8) an ultralytics checkpoint.

The command (its flags, checks and messages) is vfmkd/engine/commands/export.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.export import main  # noqa: E402
from vfmkd.utils.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(main)
