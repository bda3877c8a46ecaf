#!/usr/bin/env python
"""Export a trained student to ONNX, TorchScript or (YOLOv8) an ultralytics checkpoint.

The command (its flags, checks and messages) is vfmkd/engine/commands/export.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.core.config import experiment_from_dict, experiment_record, read_yaml, resolve_path  # noqa: E402
from vfmkd.core.errors import ConfigError  # noqa: E402
from vfmkd.engine.builders import class_names, detection_classes  # noqa: E402
from vfmkd.engine.export.exporter import (  # noqa: E402
    FORMATS,
    ExportMismatchError,
    default_output,
    export_student,
    load_student,
)
from vfmkd.engine.export.outputs import refuse_checkpoint_output  # noqa: E402
from vfmkd.engine.export.promptable import export_promptable as export_promptable_graphs  # noqa: E402
from vfmkd.engine.export.promptable import output_paths, promptable_head  # noqa: E402
from vfmkd.engine.export.student_graph import export_outputs, size_multiple  # noqa: E402
from vfmkd.utils.checkpoint import load_checkpoint  # noqa: E402
from vfmkd.utils.cli import OVERRIDES_HELP, entry, sort_positionals  # noqa: E402
from vfmkd.utils.logging import get_logger  # noqa: E402


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


def resolve_config(checkpoint: Path, config: Optional[str], overrides: Sequence[str]) -> tuple[Dict[str, Any], str]:
    """The experiment config of the export and where it came from."""
    if config is None:
        run_config = checkpoint.resolve().parent.parent / "config.yaml"
        if run_config.is_file():
            config = str(run_config)
    if config is not None:
        return experiment_from_dict(read_yaml(config), overrides, config), config
    stored = load_checkpoint(checkpoint).get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"{checkpoint} is not inside a run directory and stores no config; pass --config "
                          "<run>/config.yaml")
    return experiment_from_dict(stored, overrides,
                                f"{checkpoint} (stored config)"), f"the config stored in {checkpoint}"


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


if __name__ == "__main__":
    entry(main)
