#!/usr/bin/env python
"""Train a student with task losses and feature distillation from cached and live teachers.

    python tools/train.py configs/experiments/yolov8_sam_coco128.yaml train.epochs=3 data.batch_size=8
    python tools/train.py --config configs/experiments/yolov8_sam2_coco.yaml --backbone yolov8 --teacher sam2 \
        --dataset coco128

The command (its flags, checks and messages) is vfmkd/engine/commands/train.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.train import main  # noqa: E402
from vfmkd.utils.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(main)
