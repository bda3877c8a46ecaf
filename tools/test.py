#!/usr/bin/env python
"""Evaluate a trained student on the validation split: precision, recall, mAP50, mAP50-95 and the

The command (its flags, checks and messages) is vfmkd/engine/commands/test.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.test import main  # noqa: E402
from vfmkd.utils.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(main)
