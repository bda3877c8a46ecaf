"""Export a trained student to ONNX, TorchScript or (YOLOv8) an ultralytics checkpoint.

What is exported: backbone -> neck -> task heads in eval mode, without the distillation adapters.
The ultralytics checkpoint is what `ultralytics.YOLO(path)` loads (predict, val).

    python tools/export.py work_dirs/<run>/checkpoints/best.pt --format onnx
    python tools/export.py --checkpoint work_dirs/<run>/checkpoints/best.pt --format torchscript --dynamic
    python tools/export.py work_dirs/<run>/checkpoints/best.pt --format ultralytics   # -> best.ultralytics.pt

The config defaults to the run's config.yaml next to checkpoints/ (else the config stored in the
checkpoint); --config and key=value overrides change it. The output defaults to the checkpoint's
name with the format's suffix (best.onnx, best.torchscript, best.ultralytics.pt) and is written
atomically. An ONNX export is checked with ONNX Runtime against PyTorch on a probe input.

Outputs: each head's eval output in config order; an instance (yolo_seg_head) head adds its mask
prototypes right after its predictions (ONNX names output0/output1 for a one-head student, else
output_<head> / proto_<head>; TorchScript returns them as a tuple in that order).

A promptable student (a sam_decoder head) exports as SAM does, in two files beside the output:
best.encoder.onnx (images -> image_embeddings) and best.decoder.onnx (image_embeddings + box/point
prompts -> low-res mask logits, IoU predictions), or the same two as .torchscript; see
vfmkd/engine/export/promptable.py. The output never replaces a training checkpoint (exit 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from vfmkd.core.config import experiment_record, resolve_path
from vfmkd.core.errors import ConfigError
from vfmkd.engine.builders import class_names, detection_classes
from vfmkd.engine.commands.checkpoint_run import resolve_config
from vfmkd.engine.export.exporter import (
    FORMATS,
    ExportMismatchError,
    default_output,
    export_student,
    load_student,
)
from vfmkd.engine.export.outputs import refuse_checkpoint_output
from vfmkd.engine.export.promptable import export_promptable as export_promptable_graphs
from vfmkd.engine.export.promptable import output_paths, promptable_head
from vfmkd.engine.export.student_graph import export_outputs, size_multiple
from vfmkd.utils.cli import OVERRIDES_HELP, sort_positionals
from vfmkd.utils.logging import get_logger


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     epilog="\n".join(__doc__.strip().splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoints/best.pt or last.pt of a run (or give it positionally)")
    parser.add_argument("--config", help="the run's config.yaml (default: <run>/config.yaml next to checkpoints/, "
                                         "else the config stored in the checkpoint)")
    parser.add_argument("--format", default="onnx", help=f"one of {', '.join(FORMATS)} (default: onnx)")
    parser.add_argument("--output", help="output file, or a folder to write the default name into (default: the "
                                         "checkpoint's path with the format's suffix)")
    parser.add_argument("--imgsz", type=int, default=None,
                        help="input size, a positive multiple of 32 (under DSRL: one whose downscaled size is too) "
                             "(default: data.img_size)")
    parser.add_argument("--dynamic", action="store_true",
                        help="free batch size and input height/width (onnx, torchscript)")
    parser.add_argument("args", nargs="*", metavar="CHECKPOINT [CONFIG] key=value",
                        help="the checkpoint, optionally the config, then " + OVERRIDES_HELP)
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = build_parser().parse_intermixed_args(argv)
    overrides = sort_positionals(args, "CHECKPOINT.pt [CONFIG.yaml]")
    if args.checkpoint is None:
        raise ConfigError("no checkpoint: `tools/export.py work_dirs/<run>/checkpoints/best.pt --format onnx` "
                          "(or --checkpoint)")
    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format}: unknown format; choose from {', '.join(FORMATS)}")
    if args.format == "ultralytics" and args.output and not args.output.endswith((".pt", "/")) \
            and not resolve_path(args.output).is_dir():
        raise ConfigError(f"--output {args.output}: ultralytics loads checkpoints named *.pt; end the name with .pt")
    if args.dynamic and args.format == "ultralytics":
        raise ConfigError("--dynamic applies to onnx and torchscript; an ultralytics checkpoint takes any size already")
    args.overrides = overrides
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    log = get_logger()
    checkpoint = resolve_path(args.checkpoint)
    cfg, config_name = resolve_config(checkpoint, args.config, args.overrides)
    model = load_student(checkpoint, cfg, config_name)
    imgsz = int(experiment_record(cfg).data.img_size) if args.imgsz is None else args.imgsz
    output = resolve_path(args.output) if args.output else default_output(checkpoint, args.format)
    if args.output and (output.is_dir() or args.output.endswith(("/", "\\"))):  # a folder: the default name in it
        output = output / default_output(checkpoint, args.format).name
    promptable = args.format != "ultralytics" and promptable_head(model) is not None
    for path in output_paths(output, args.format) if promptable else (output,):
        refuse_checkpoint_output(path, checkpoint, args.format)
    names = None
    if args.format == "ultralytics":
        exp = experiment_record(cfg)
        names = class_names(exp.data.root, detection_classes(exp.model.heads))
    if promptable:
        return export_promptable(model, checkpoint, output, imgsz, args.format, args.dynamic)
    try:
        diff = export_student(model, cfg, args.format, output, imgsz, dynamic=args.dynamic, names=names)
    except ExportMismatchError as exc:
        log.error("%s", exc)
        return 1
    params = sum(p.numel() for p in model.parameters())
    log.info("exported %s (%s config) -> %s [%s, %d parameters, input (%s, 3, %d, %d)%s, %.1f MiB]",
             checkpoint, config_name, output, args.format, params, "B" if args.dynamic else 1, imgsz, imgsz,
             f", dynamic: any batch, sides that are multiples of {size_multiple(model)}" if args.dynamic else "",
             output.stat().st_size / 2**20)
    if args.format != "ultralytics":
        log.info("outputs, in order: %s", ", ".join(f"{o.name} ({o.head} {o.kind})" for o in export_outputs(model)))
    if diff:
        log.info("%s vs PyTorch on the probe inputs%s: max |diff| %s",
                 "ONNX Runtime" if args.format == "onnx" else "the traced TorchScript module",
                 " (two sizes)" if args.dynamic else "", ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    if args.format == "ultralytics":
        log.info("load it with: from ultralytics import YOLO; YOLO('%s').predict(image, imgsz=%d)", output, imgsz)
    return 0


def export_promptable(model, checkpoint: Path, output: Path, imgsz: int, fmt: str, dynamic: bool) -> int:
    """The two files of a promptable student (encoder, decoder), each checked against PyTorch."""
    log = get_logger()
    try:
        diffs = export_promptable_graphs(model, output, imgsz, fmt, dynamic=dynamic)
    except ExportMismatchError as exc:
        log.error("%s", exc)
        return 1
    paths = diffs.pop("paths")
    log.info("exported %s (promptable, %s) -> encoder %s (images (%s, 3, %d, %d) -> image_embeddings), decoder %s "
             "(image_embeddings, point_coords, point_labels -> low_res_masks, iou_predictions)",
             checkpoint, fmt, paths["encoder"], "B" if dynamic else 1, imgsz, imgsz, paths["decoder"])
    log.info("%s vs PyTorch: %s", "ONNX Runtime" if fmt == "onnx" else "the saved TorchScript modules",
             ", ".join(f"{g} {k} {v:.2e}" for g, d in diffs.items() for k, v in d.items()))
    return 0

