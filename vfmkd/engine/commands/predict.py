"""Segment what a box or points prompt with a trained promptable student (a sam_decoder head).

    python tools/predict.py --checkpoint work_dirs/<run>/checkpoints/best.pt --image dog.jpg --box 40 60 380 420
    python tools/predict.py --checkpoint best.pt --image dog.jpg --point 210 240 --point 260 300 --output out/
    python tools/predict.py --checkpoint best.pt --image dog.jpg --point 210 240 --background-point 50 50

Prompts are in pixels of the original image (x right, y down). The image is letterboxed as the
dataset does (data.img_size), the prompt carried onto that canvas, the head decodes one mask, and the
mask is carried back (the letterbox undone) to the original size. Writes <stem>_mask.png (binary,
0/255, the image's size) and <stem>_overlay.png into --output (default: <run>/predictions/ next to
checkpoints/, else ./predictions/). The config defaults to the run's config.yaml (else the one stored
in the checkpoint). A prompt outside the image, a file that is not an image, an --output that is a
file, or a checkpoint without a sam_decoder head exits 2 with one line; the arguments are checked
before the model is loaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vfmkd.core.config import experiment_record, resolve_path
from vfmkd.core.errors import ConfigError
from vfmkd.datasets.image_files import load_rgb
from vfmkd.datasets.transforms import letterbox
from vfmkd.engine.commands.checkpoint_run import resolve_config
from vfmkd.engine.export.exporter import load_student
from vfmkd.engine.export.promptable import promptable_head
from vfmkd.utils.atomic_files import atomic_output
from vfmkd.utils.cli import OVERRIDES_HELP, sort_positionals
from vfmkd.utils.logging import get_logger

OVERLAY_COLOUR = np.array([30, 144, 255], dtype=np.float32)  # SAM's demo blue


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     epilog="\n".join(__doc__.strip().splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoints/best.pt of a run with a sam_decoder head (or positionally)")
    parser.add_argument("--image", required=True, help="the image to segment")
    parser.add_argument("--box", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"),
                        help="box prompt in original image pixels")
    parser.add_argument("--point", nargs=2, type=float, action="append", default=[], metavar=("X", "Y"),
                        help="foreground point in original image pixels (repeatable)")
    parser.add_argument("--background-point", nargs=2, type=float, action="append", default=[], metavar=("X", "Y"),
                        help="background point (repeatable)")
    parser.add_argument("--output", help="output folder (default: <run>/predictions, else ./predictions)")
    parser.add_argument("--config", help="the run's config.yaml (default: <run>/config.yaml, else the stored config)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("args", nargs="*", metavar="CHECKPOINT key=value",
                        help="the checkpoint, then " + OVERRIDES_HELP)
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = build_parser().parse_intermixed_args(argv)
    args.overrides = sort_positionals(args, "CHECKPOINT.pt [CONFIG.yaml]")
    if args.checkpoint is None:
        raise ConfigError("no checkpoint: `tools/predict.py --checkpoint work_dirs/<run>/checkpoints/best.pt "
                          "--image X.jpg --box X1 Y1 X2 Y2`")
    if args.box is None and not args.point:
        raise ConfigError("no prompt: give --box X1 Y1 X2 Y2 and/or --point X Y (original image pixels)")
    return args


def check_prompts(image: Path, hw: Tuple[int, int], box: Optional[List[float]], points: List[List[float]]) -> None:
    """Every prompt lies inside the image (0 <= x <= W, 0 <= y <= H) and the box has x1 < x2, y1 < y2."""
    h, w = hw
    size = f"{image} is {w} x {h} pixels (x in [0, {w}], y in [0, {h}])"
    if box is not None:
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise ConfigError(f"--box {x1:g} {y1:g} {x2:g} {y2:g} is not a box inside the image: {size}, and a box "
                              f"needs x1 < x2, y1 < y2")
    for x, y in points:
        if not (0 <= x <= w and 0 <= y <= h):
            raise ConfigError(f"point ({x:g}, {y:g}) lies outside the image: {size}")


def unletterbox_logits(logits: torch.Tensor, affine: Tuple[float, float, float, float], hw: Tuple[int, int],
                       size: int) -> torch.Tensor:
    """(h, w) low-res canvas logits -> (H, W) logits of the original image: upsampled to the canvas
    (bilinear, as SAM's postprocess), the letterbox's content cropped and resized to the image."""
    h, w = hw
    sx, sy, ox, oy = affine
    up = F.interpolate(logits[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    top, left = int(round(oy)), int(round(ox))
    crop = up[..., top:top + max(round(h * sy), 1), left:left + max(round(w * sx), 1)]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def overlay(rgb: np.ndarray, mask: np.ndarray, box: Optional[List[float]],
            points: List[Tuple[float, float, int]]) -> np.ndarray:
    out = rgb.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * OVERLAY_COLOUR
    out = np.ascontiguousarray(out.clip(0, 255).astype(np.uint8))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    thick = max(1, round(max(rgb.shape[:2]) / 300))
    if box is not None:
        cv2.rectangle(out, (int(box[0]), int(box[1])), (int(box[2]), int(box[3])), (0, 255, 0), thick)
    for x, y, label in points:
        cv2.circle(out, (int(x), int(y)), 3 * thick, (0, 255, 0) if label else (255, 0, 0), -1)
    return out


@torch.no_grad()
def predict(model: Any, head: str, rgb: np.ndarray, size: int, box: Optional[List[float]],
            points: List[Tuple[float, float, int]], device: torch.device) -> Tuple[np.ndarray, float]:
    """The (H, W) bool mask of the prompt and the decoder's IoU prediction."""
    canvas, affine = letterbox(rgb, size)
    sx, sy, ox, oy = affine
    images = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))).float().div_(255.0)[None].to(device)
    module = model.heads[head]
    embeddings = module(model.neck(model.backbone(images)))
    kwargs: Dict[str, torch.Tensor] = {}
    if box is not None:
        kwargs["boxes"] = torch.tensor([[box[0] * sx + ox, box[1] * sy + oy, box[2] * sx + ox, box[3] * sy + oy]],
                                       device=device)
    if points:
        kwargs["points"] = torch.tensor([[[x * sx + ox, y * sy + oy] for x, y, _ in points]], device=device)
        kwargs["point_labels"] = torch.tensor([[label for _, _, label in points]], device=device)
    low, iou = module.decode(embeddings, torch.zeros(1, dtype=torch.long, device=device), **kwargs)
    logits = unletterbox_logits(low[0, 0].cpu(), affine, rgb.shape[:2], size)
    return (logits > 0).numpy(), float(iou[0, 0])


def check_output(args: argparse.Namespace, checkpoint: Path) -> Path:
    """The output folder (created): --output, else <run>/predictions, else ./predictions; an existing
    file there is an error that says it must be a folder. Checked before anything is loaded."""
    if args.output:
        out_dir = resolve_path(args.output)
    else:
        run = checkpoint.resolve().parent.parent
        out_dir = run / "predictions" if (run / "config.yaml").is_file() else Path("predictions").resolve()
    for parent in (out_dir, *out_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--output {out_dir}: {parent} is an existing file; --output must be a folder "
                              f"(<stem>_mask.png and <stem>_overlay.png are written into it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def read_image(image: Path) -> np.ndarray:
    """The image as load_rgb decodes it for training; a folder, a missing file or a file Pillow
    cannot decode is an error naming it."""
    if image.is_dir():
        raise ConfigError(f"--image {image} is a folder: give one image file (the prompts are in its pixels)")
    if not image.is_file():
        raise FileNotFoundError(f"--image {image}: no such file")
    try:
        return load_rgb(image)
    except Exception as exc:  # PIL: UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        raise ConfigError(f"--image {image} cannot be decoded as an image ({type(exc).__name__}: {exc}); give a "
                          f"JPEG/PNG/BMP/WebP/TIFF file") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    log = get_logger()
    checkpoint, image = resolve_path(args.checkpoint), resolve_path(args.image)
    # Every argument is checked before the config, the checkpoint or the model is loaded.
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    rgb = read_image(image)
    points = [(x, y, 1) for x, y in args.point] + [(x, y, 0) for x, y in args.background_point]
    check_prompts(image, rgb.shape[:2], args.box, [[x, y] for x, y, _ in points])
    out_dir = check_output(args, checkpoint)
    cfg, config_name = resolve_config(checkpoint, args.config, args.overrides)
    model = load_student(checkpoint, cfg, config_name)
    head = promptable_head(model)
    if head is None:
        heads = ", ".join(f"{n} ({dict(e).get('type')})" for n, e in dict(experiment_record(cfg).model.heads).items())
        raise ConfigError(f"{checkpoint} has no sam_decoder (promptable) head to prompt; its heads: {heads}. Train a "
                          f"promptable student (configs/experiments/yolov8s_sam_promptable_coco128.yaml)")
    device = torch.device(args.device)
    model.to(device)
    size = int(experiment_record(cfg).data.img_size)
    mask, score = predict(model, head, rgb, size, args.box, points, device)
    mask_path, overlay_path = out_dir / f"{image.stem}_mask.png", out_dir / f"{image.stem}_overlay.png"
    for path, pixels in ((mask_path, mask.astype(np.uint8) * 255),
                         (overlay_path, overlay(rgb, mask, args.box, points))):
        with atomic_output(path) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
    log.info("%s (%d x %d): mask of %d pixels (%.1f%%), predicted IoU %.3f -> %s, %s", image, rgb.shape[1],
             rgb.shape[0],
             int(mask.sum()), 100.0 * mask.mean(), score, mask_path, overlay_path)
    return 0

