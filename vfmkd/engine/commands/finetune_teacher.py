"""Fine-tune a SAM teacher with LoRA on a dataset's masks, for the lora_sam teacher to distil from.

    python tools/finetune_teacher.py configs/finetune/sam_lora_person_coco128.yaml train.epochs=5
    python tools/finetune_teacher.py configs/finetune/sam_lora_person_coco128.yaml --resume train.epochs=10

The run lives in <work_dir>/<experiment_name>/: config.yaml, finetune.log, metrics.json (held-out Dice/IoU
before fine-tuning and after every epoch), checkpoints/last.pt (--resume) and lora_sam.pt, the file
teachers.lora_sam.lora_checkpoint takes.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from vfmkd.core.config import resolve_path
from vfmkd.core.errors import ConfigError
from vfmkd.engine.finetune.config import load_finetune_config
from vfmkd.engine.finetune.loop import LAST, TEACHER_FILE, Finetuner
from vfmkd.engine.training.run_dir import write_run_config
from vfmkd.utils.cli import OVERRIDES_HELP, sort_positionals
from vfmkd.utils.logging import setup_logging


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", help="fine-tuning YAML, e.g. configs/finetune/sam_lora_person_coco128.yaml")
    parser.add_argument("--resume", action="store_true", help="continue the run from its checkpoints/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="start over in a run directory that has a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars (logs stay)")
    parser.add_argument("args", nargs="*", metavar="CONFIG key=value", help="CONFIG, then " + OVERRIDES_HELP)
    args = parser.parse_intermixed_args(argv)
    overrides = sort_positionals(args, "CONFIG.yaml", "(positional or --config)")
    if args.config is None:
        raise ConfigError("no fine-tuning config: e.g. `tools/finetune_teacher.py "
                          "configs/finetune/sam_lora_person_coco128.yaml`")
    cfg = load_finetune_config(args.config, overrides)
    run_dir = resolve_path(cfg["work_dir"]) / cfg["experiment_name"]
    if (run_dir / LAST).exists() and not (args.resume or args.overwrite):
        raise ConfigError(f"{run_dir} already holds a fine-tuning run ({LAST}); continue it with --resume, start "
                          "over with --overwrite, or set experiment_name=<another name>")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(run_dir / "finetune.log")
    tuner = Finetuner(cfg, run_dir, resume=args.resume, progress=not args.no_progress, log=log)
    write_run_config(run_dir, cfg)
    history = tuner.fit()
    before, after = history[0], history[-1]
    log.info("held-out Dice %.4f -> %.4f, IoU %.4f -> %.4f (epoch 0 -> %d); teacher file %s", before["val_dice"],
             after["val_dice"], before["val_iou"], after["val_iou"], after["epoch"], run_dir / TEACHER_FILE)
    log.info("distil from it: teachers.lora_sam.lora_checkpoint=%s", run_dir / TEACHER_FILE)
    return 0
