#!/usr/bin/env python
"""Evaluate a trained student on the validation split (precision, recall, mAP50, mAP50-95).

    python tools/test.py --config configs/experiments/yolov8_sam_coco128.yaml --checkpoint work_dirs/.../best.pt
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.core.config import load_experiment, resolve_path  # noqa: E402
from vfmkd.core.errors import CheckpointError  # noqa: E402
from vfmkd.core.evaluator import evaluate_detection  # noqa: E402
from vfmkd.core.run_dir import create_run_dir, write_json, write_run_config  # noqa: E402
from vfmkd.core.train_setup import build_loader, class_names, detection_classes, select_device  # noqa: E402
from vfmkd.datasets import DetectionDataset  # noqa: E402
from vfmkd.models.unified_model import UnifiedModel  # noqa: E402
from vfmkd.utils.checkpoint import load_checkpoint  # noqa: E402
from vfmkd.utils.cli import entry, experiment_parser  # noqa: E402
from vfmkd.utils.logging import setup_logging  # noqa: E402


def run_dir_of(checkpoint: Path) -> Optional[Path]:
    """``<run>/checkpoints/x.pt`` -> ``<run>`` when that is a vfmkd run directory."""
    run = checkpoint.resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = experiment_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/best.pt or last.pt written by tools/train.py")
    parser.add_argument("--split", default=None, help="dataset split to evaluate (default: data.val_split)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    args = parser.parse_args(argv)
    cfg = load_experiment(args.config, args.overrides)
    checkpoint = resolve_path(args.checkpoint)
    run_dir = run_dir_of(checkpoint)
    if run_dir is None:
        run_dir = create_run_dir(resolve_path(cfg["work_dir"]), cfg["experiment_name"] + "_test")
        write_run_config(run_dir, cfg)
    log = setup_logging(run_dir / "test.log")
    state = load_checkpoint(checkpoint)
    if "model" not in state:
        raise CheckpointError(f"{checkpoint} is not a vfmkd training checkpoint (no 'model' entry); pass checkpoints/best.pt of a run")
    device = select_device(cfg["train"]["device"])
    model = UnifiedModel.from_config(cfg["model"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint} does not fit the model of {args.config} (was it trained with another backbone, scale or "
            f"num_classes? pass the run's own config.yaml): {str(exc).splitlines()[0]}"
        ) from exc
    model.to(device)
    data = cfg["data"]
    split = args.split or data["val_split"]
    num_classes = detection_classes(cfg)
    dataset = DetectionDataset(str(resolve_path(data["root"])), split, data["img_size"], data["limit"], num_classes)
    loader = build_loader(dataset, cfg["eval"]["batch_size"], data["num_workers"], False, cfg["train"]["seed"])
    metrics = evaluate_detection(
        model, loader, class_names(data, num_classes), device,
        conf=cfg["eval"]["conf"], iou=cfg["eval"]["iou"], max_det=cfg["eval"]["max_det"], progress=not args.no_progress,
    )
    metrics.update(checkpoint=str(checkpoint), split=split, epoch=state.get("epoch"))
    out = run_dir / f"test_metrics_{split}.json"
    write_json(out, metrics)
    log.info("%s: mAP50=%.4f mAP50-95=%.4f P=%.4f R=%.4f on %d images -> %s",
             split, metrics["mAP50"], metrics["mAP50-95"], metrics["precision"], metrics["recall"], metrics["images"], out)
    return 0


if __name__ == "__main__":
    entry(main)
