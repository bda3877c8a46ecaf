"""Train a student with task losses and feature distillation from cached and live teachers.

    python tools/train.py configs/experiments/yolov8_sam_coco128.yaml train.epochs=3 data.batch_size=8
    python tools/train.py --config configs/experiments/yolov8_sam2_coco.yaml --backbone yolov8 --teacher sam2 \
        --dataset coco128
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from vfmkd.engine.training.distributed import leave_distributed
from vfmkd.engine.training.resume import RunFinished
from vfmkd.engine.training.trainer import Trainer
from vfmkd.utils.cli import experiment_parser, load_experiment_args, parse_experiment_args
from vfmkd.utils.logging import get_logger


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = experiment_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars (logs stay)")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_CKPT",
                        help="continue a killed run exactly where its checkpoints/last.pt left it (model, adapters, "
                             "optimizer, scheduler, epoch and step, every RNG, the run directory); the config "
                             "defaults to the run's config.yaml; a changed model/teachers/losses/data/seed is refused")
    args = parse_experiment_args(parser, argv)
    cfg = load_experiment_args(args)
    try:
        return _train(cfg, args)
    finally:
        leave_distributed()  # under torchrun: every rank leaves its group cleanly, however the run ended


def _train(cfg: Dict[str, Any], args: argparse.Namespace) -> int:
    try:
        trainer = Trainer(cfg, progress=not args.no_progress, resume=Path(args.resume) if args.resume else None)
    except RunFinished as done:  # a finished run resumed: say so, touch nothing
        get_logger().info("%s", done)
        return 0
    metrics = trainer.fit()
    best, score = metrics["best_val"] or {}, metrics["best_metric"]
    picked = f"val {score['head']} {score['metric']}={score['value']:.4f}" if score else "no validation score"
    if score and "mAP50" in best and score["metric"] != "mAP50-95":  # a detection head beside the one that picks
        picked += f", detection mAP50={best['mAP50']:.4f} mAP50-95={best['mAP50-95']:.4f}"
    trainer.log.info("done in %.0fs: best epoch %s, %s; run directory %s",
                     metrics["train_seconds"], metrics["best_epoch"], picked, trainer.run_dir)
    for key, value in (metrics.get("final_fidelity") or {}).items():
        trainer.log.info("held-out %s: cosine %.4f, mse %.4f", key, value["cos"], value["mse"])
    return 0

