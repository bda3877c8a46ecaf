"""Online teachers: the frozen teacher runs inside the training step on the batch the student sees.

The teacher is shown exactly the image content of each (augmented) student canvas: the canvas is
cropped to its content box and handed to the teacher's own preprocessing, on the training device
(no device -> CPU -> device round trip), so a live pass and a cached one reach the distiller in the
same form. The reference frame of a live pass is the student canvas, hence its ``student_affine``
is the identity.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch

from vfmkd.datasets.cache_codec import combine_moments, image_moments, valid_cells
from vfmkd.datasets.records import Batch
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.teachers.base import BaseTeacher

IDENTITY_AFFINE = (1.0, 1.0, 0.0, 0.0)


class OnlineTeacher:
    """Wraps a :class:`BaseTeacher` for live passes: ``targets(batch)`` -> :class:`TeacherTargets`
    with float maps (B, C, h, w), ``affine`` (B, 4) canvas -> teacher pixels, ``valid_hw`` (B, 2) and
    the identity ``student_affine`` (B, 4), all on ``device``."""

    def __init__(self, name: str, teacher: BaseTeacher, device: torch.device) -> None:
        self.name = name
        self.teacher = teacher
        self.device = device
        self.channels_last = teacher.device.type == "cuda"  # NHWC feeds cuDNN's fast conv paths

    @torch.no_grad()
    def targets(self, batch: Batch) -> TeacherTargets:
        boxes = batch.views.content_box
        images = batch.images.to(self.teacher.device, non_blocking=True)
        tb = self.teacher.preprocess_crops(images, boxes.to(images.device))
        pixels = tb.pixels
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        maps = self.teacher.forward_features(pixels)
        # crop pixel (x - x1) -> teacher pixel: canvas -> teacher affine = (sx, sy, ox - sx*x1, oy - sy*y1)
        aff = tb.affine.to(device=self.device, dtype=torch.float32).clone()
        origin = boxes[:, :2].to(device=self.device, dtype=torch.float32)
        aff[:, 2:4] -= aff[:, 0:2] * origin
        return TeacherTargets(
            features={k: v.to(self.device, non_blocking=True) for k, v in maps.items()},
            affine=aff,
            valid_hw=tb.valid_hw.to(device=self.device, dtype=torch.float32),
            input_size=int(self.teacher.input_size),
            student_affine=torch.tensor([IDENTITY_AFFINE] * len(batch), device=self.device),
        )


@torch.no_grad()
def measure_channel_stats(online: OnlineTeacher, batches: Iterable[Batch],
                          max_images: int = 32) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean/std of an online-only teacher's maps over the valid cells of the first
    ``max_images`` training images: the statistics a cache stores, by the same code and cell rule."""
    counts: Dict[str, List[np.ndarray]] = {}
    moments: Dict[str, List[np.ndarray]] = {}
    seen = 0
    for batch in batches:
        t = online.targets(batch)
        valid = t.valid_hw.cpu().numpy()
        for name, fmap in t.features.items():
            h, w = fmap.shape[-2:]
            rows, cols = valid_cells(valid, t.input_size // h, h, w)
            counts.setdefault(name, []).append(rows * cols)
            moments.setdefault(name, []).append(image_moments(fmap.float().cpu(), rows, cols))
        seen += len(batch)
        if seen >= max_images:
            break
    stats = {}
    for name in counts:
        mean, std = combine_moments(np.concatenate(counts[name]), np.concatenate(moments[name]))
        stats[name] = (torch.from_numpy(mean).float(), torch.from_numpy(std).float().clamp_min(1e-6))
    return stats
