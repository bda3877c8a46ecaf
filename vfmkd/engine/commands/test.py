"""Evaluate a trained student on the validation split: precision, recall, mAP50, mAP50-95 and the
held-out student-teacher cosine/MSE per distilled teacher and level.

    python tools/test.py work_dirs/<run>/config.yaml work_dirs/<run>/checkpoints/best.pt
    python tools/test.py --config work_dirs/<run>/config.yaml --checkpoint work_dirs/<run>/checkpoints/best.pt
"""
from __future__ import annotations

from typing import Optional, Sequence

from vfmkd.core.config import experiment_record, resolve_path
from vfmkd.engine.builders import head_tasks
from vfmkd.engine.commands.checkpoint_run import run_dir_of
from vfmkd.engine.evaluation.tester import FIDELITY_SOURCES, test_checkpoint, test_results_path
from vfmkd.engine.training.run_dir import create_run_dir, remove_unused_run_dir, write_json, write_run_config
from vfmkd.utils.cli import experiment_parser, load_experiment_args, parse_experiment_args
from vfmkd.utils.logging import setup_logging


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = experiment_parser(__doc__.strip().splitlines()[0], checkpoint=True)
    parser.add_argument("--split", default=None, help="dataset split to evaluate (default: data.val_split)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    parser.add_argument("--fidelity", choices=FIDELITY_SOURCES, default="cache",
                        help="held-out student-teacher fidelity from the split's teacher cache (default; skipped, "
                             "saying how to get it, when there is none), from the live teacher where no cache exists "
                             "(needs the teacher's weights; minutes on CPU), or off. mAP never needs the teacher")
    args = parse_experiment_args(parser, argv)
    cfg = load_experiment_args(args)
    checkpoint = resolve_path(args.checkpoint)
    run_dir = run_dir_of(checkpoint)
    made = run_dir is None  # a checkpoint outside a run directory: results go to a new one
    if made:
        run_dir = create_run_dir(resolve_path(cfg["work_dir"]), cfg["experiment_name"] + "_test")
        write_run_config(run_dir, cfg)
    log = setup_logging(run_dir / "test.log")
    split = args.split or cfg["data"]["val_split"]
    try:
        metrics = test_checkpoint(cfg, checkpoint, split, args.config, progress=not args.no_progress, out_dir=run_dir,
                                   fidelity=args.fidelity)
    except BaseException:
        if made:  # stopped before any result: no empty folder is left behind
            setup_logging(None)
            remove_unused_run_dir(run_dir, ("test_metrics_*.json",))
        raise
    out = run_dir / f"test_metrics_{split}.json"
    write_json(out, metrics)
    for head, task in head_tasks(experiment_record(cfg).model).items():
        numbers = "  ".join(f"{k}={v:.4f}" for k, v in metrics[head].items() if isinstance(v, float))
        log.info("%s: %s (%s) %s", split, head, task, numbers)
    if "panoptic" in metrics:  # instance + semantic heads merged (vfmkd/engine/evaluation/panoptic_quality.py)
        pan = metrics["panoptic"]
        log.info("%s: panoptic PQ=%.4f SQ=%.4f RQ=%.4f (things PQ=%.4f, stuff PQ=%.4f) over %d images, %d skipped",
                 split, pan["PQ"], pan["SQ"], pan["RQ"], pan["PQ_things"], pan["PQ_stuff"], pan["images"],
                 pan["skipped"])
    log.info("metrics -> %s, %s; pictures -> %s", out, test_results_path(run_dir, split), run_dir / "visualizations")
    for key, value in (metrics.get("fidelity") or {}).items():
        log.info("%s: held-out %s cosine=%.4f mse=%.4f over %d cells", split, key, value["cos"], value["mse"],
                 value["cells"])
    return 0

