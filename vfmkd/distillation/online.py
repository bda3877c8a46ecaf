"""Online teachers: the frozen teacher runs inside the training step on the batch the student sees.

The teacher is shown exactly the image content of each (augmented) student canvas: the canvas is
cropped to its content box and handed to the teacher's own preprocessing, so a live pass and a
cached one reach the distiller in the same form. The reference frame of a live pass is the student
canvas, hence its ``student_affine`` is the identity.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch

from vfmkd.teachers.base import BaseTeacher

IDENTITY_AFFINE = (1.0, 1.0, 0.0, 0.0)


def canvas_crops(images: torch.Tensor, content_box: torch.Tensor) -> List[np.ndarray]:
    """(B, 3, S, S) float images in [0, 1] + (B, 4) integer boxes -> RGB uint8 (h, w, 3) crops."""
    pixels = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    crops = []
    for img, (x1, y1, x2, y2) in zip(pixels, content_box.tolist()):
        crop = img[y1:y2, x1:x2]
        crops.append(np.ascontiguousarray(crop if crop.size else img))
    return crops


class OnlineTeacher:
    """Wraps a :class:`BaseTeacher` for live passes: ``targets(batch)`` -> the same dict a cached
    batch carries (``features`` {name: (B, C, h, w)}, ``affine``, ``valid_hw``, ``input_size``) plus
    ``student_affine`` (B, 4), all on ``device``."""

    def __init__(self, name: str, teacher: BaseTeacher, device: torch.device, features: Tuple[str, ...] = ()) -> None:
        self.name = name
        self.teacher = teacher
        self.device = device
        self.features = features  # empty: keep every map the teacher returns
        self.channels_last = teacher.device.type == "cuda"  # NHWC feeds cuDNN's fast conv paths

    @torch.no_grad()
    def targets(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        boxes = batch["content_box"].cpu()
        tb = self.teacher.preprocess(canvas_crops(batch["images"], boxes))
        pixels = tb.pixels.to(self.teacher.device, non_blocking=True)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        maps = self.teacher.forward_features(pixels)
        if self.features:
            maps = {k: v for k, v in maps.items() if k in self.features}
        # crop pixel (x - x1) -> teacher pixel: canvas -> teacher affine = (sx, sy, ox - sx*x1, oy - sy*y1)
        aff = tb.affine.to(torch.float32).clone()
        aff[:, 2] -= aff[:, 0] * boxes[:, 0].float()
        aff[:, 3] -= aff[:, 1] * boxes[:, 1].float()
        b = aff.shape[0]
        return {
            "features": {k: v.to(self.device, non_blocking=True) for k, v in maps.items()},
            "affine": aff.to(self.device),
            "valid_hw": tb.valid_hw.to(device=self.device, dtype=torch.float32),
            "input_size": int(self.teacher.input_size),
            "student_affine": torch.tensor([IDENTITY_AFFINE] * b, device=self.device),
        }


@torch.no_grad()
def measure_channel_stats(online: OnlineTeacher, batches, max_images: int = 32) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean/std of an online-only teacher's maps over valid locations of the first
    ``max_images`` training images (the standardisation a cache would have stored)."""
    sums: Dict[str, torch.Tensor] = {}
    sq: Dict[str, torch.Tensor] = {}
    count: Dict[str, float] = {}
    seen = 0
    for batch in batches:
        t = online.targets(batch)
        for name, fmap in t["features"].items():
            fmap = fmap.double()
            h, w = fmap.shape[-2:]
            stride_y, stride_x = t["input_size"] / h, t["input_size"] / w
            ys = (torch.arange(h, device=fmap.device) + 0.5) * stride_y
            xs = (torch.arange(w, device=fmap.device) + 0.5) * stride_x
            valid = (ys[None, :, None] < t["valid_hw"][:, 0, None, None]) & (xs[None, None, :] < t["valid_hw"][:, 1, None, None])
            m = valid[:, None].to(fmap.dtype)
            sums[name] = sums.get(name, 0) + (fmap * m).sum((0, 2, 3))
            sq[name] = sq.get(name, 0) + (fmap.pow(2) * m).sum((0, 2, 3))
            count[name] = count.get(name, 0.0) + float(m.sum())
        seen += batch["images"].shape[0]
        if seen >= max_images:
            break
    stats = {}
    for name in sums:
        mean = sums[name] / max(count[name], 1.0)
        var = (sq[name] / max(count[name], 1.0) - mean.pow(2)).clamp_min(0)
        stats[name] = (mean.float(), var.sqrt().float().clamp_min(1e-6))
    return stats
