#!/usr/bin/env python
"""Ablate a recipe: train the experiment with each of its parts off (learnable fusion, DSRL, teacher

The command (its flags, checks and messages) is vfmkd/engine/commands/ablate.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.ablate import main  # noqa: E402
from vfmkd.utils.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(main)
