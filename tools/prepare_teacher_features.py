#!/usr/bin/env python
"""Run a frozen teacher once over a dataset split and cache its features (HDF5) for training.

    python tools/prepare_teacher_features.py --teacher sam --dataset coco128 --splits train2017 val2017 \\
        --output teacher_features/sam/ teacher.variant=vit_b teacher.input_size=1024 [--storage int8] [--with-flip]
    torchrun --nproc_per_node N tools/prepare_teacher_features.py ...   # one shard per rank, joined by rank 0

The command is vfmkd/engine/commands/prepare_features.py (flags, resume, masks, sharding: its docstring);
the filling loop is vfmkd/cache/fill.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.prepare_features import main  # noqa: E402
from vfmkd.utils.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(main)
