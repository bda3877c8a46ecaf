"""Ablate a recipe: train the experiment with each of its parts off (learnable fusion, DSRL, teacher
distillation) for the same budget and write a Markdown table (the task metric, PQ, mIoU, time, memory).

    python tools/ablate.py configs/experiments/regnet_fusion_dsrl_sam_panoptic_coco128.yaml train.epochs=10
    python tools/ablate.py --config X.yaml --parts dsrl teachers --output work_dirs/my_ablation
    python tools/ablate.py configs/experiments/lora_sam_binary_person_coco128.yaml --parts teachers  # teacher or not
"""
from __future__ import annotations

from typing import Optional, Sequence

from vfmkd.core.config import resolve_path
from vfmkd.engine.training.ablation import PARTS, ablate
from vfmkd.engine.training.run_dir import create_run_dir, write_run_config
from vfmkd.utils.cli import experiment_parser, load_experiment_args, parse_experiment_args
from vfmkd.utils.logging import setup_logging


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = experiment_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS],
                        help="parts to ablate (default: every part the experiment uses)")
    parser.add_argument("--output", help="folder of the ablation (default: <work_dir>/<experiment>_ablation/<time>)")
    args = parse_experiment_args(parser, argv)
    cfg = load_experiment_args(args)
    out = resolve_path(args.output) if args.output else create_run_dir(resolve_path(cfg["work_dir"]),
                                                                       cfg["experiment_name"] + "_ablation")
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, cfg)
    log = setup_logging(out / "ablation.log")
    rows = ablate(cfg, out, args.parts, log=log.info)
    for row in rows:
        log.info("%-12s %s=%s PQ=%s mIoU=%s %.0fs peak RSS %.0f MiB", row["variant"], row["metric"], row["value"],
                 row["PQ"], row["mIoU"], row["train_s"], row["peak_rss_mib"])
    log.info("table -> %s", out / "ablation.md")
    return 0

