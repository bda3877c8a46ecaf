#!/usr/bin/env python
"""Segment what a box or points prompt with a trained promptable student (a sam_decoder head).

    python tools/predict.py --checkpoint work_dirs/<run>/checkpoints/best.pt --image dog.jpg --box 40 60 380 420
    python tools/predict.py --checkpoint best.pt --image dog.jpg --point 210 240 --point 260 300 --output out/
    python tools/predict.py --checkpoint best.pt --image dog.jpg --point 210 240 --background-point 50 50

The command (its flags, checks and messages) is vfmkd/engine/commands/predict.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.predict import main  # noqa: E402
from vfmkd.utils.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(main)
