#!/usr/bin/env python
"""Fine-tune a SAM teacher with LoRA on a dataset's masks, for the lora_sam teacher to distil from.

    python tools/finetune_teacher.py configs/finetune/sam_lora_person_coco128.yaml train.epochs=5
    python tools/finetune_teacher.py configs/finetune/sam_lora_person_coco128.yaml --resume train.epochs=10

The command (its flags, checks and messages) is vfmkd/engine/commands/finetune_teacher.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.finetune_teacher import main  # noqa: E402
from vfmkd.utils.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(main)
