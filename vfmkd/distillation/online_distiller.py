"""Online teachers: the frozen teacher runs inside the training step on the batch the student sees.

The teacher is shown exactly the image content of each (augmented) student canvas: the canvas is
cropped to its content box and handed to the teacher's own preprocessing, on the training device
(no device -> CPU -> device round trip), so a live pass and a cached one reach the distiller in the
same form. The reference frame of a live pass is the student canvas, hence its ``student_affine``
is the identity.

With ``masks=True`` a teacher that can segment is also prompted with every ground-truth box of each
view (``batch.boxes``: normalised cx, cy, w, h on the canvas -> canvas pixels -> teacher pixels by the
same live affine as the features) and the targets carry its :class:`MaskLogits` (label_index and cls
from ``batch.boxes``). A teacher with ``provides_head_outputs`` (a trained vfmkd model) is run through
``forward_with_heads`` and its raw head outputs travel as ``head_outputs``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch

from vfmkd.cache.codec import combine_moments, image_moments, valid_cells
from vfmkd.core.errors import ConfigError
from vfmkd.datasets.records import Batch
from vfmkd.distillation.targets import MaskLogits, TeacherTargets
from vfmkd.teachers.base import BaseTeacher, segmenting_teachers

IDENTITY_AFFINE = (1.0, 1.0, 0.0, 0.0)


class OnlineTeacher:
    """Wraps a :class:`BaseTeacher` for live passes: ``targets(batch)`` -> :class:`TeacherTargets`
    with float maps (B, C, h, w), ``affine`` (B, 4) canvas -> teacher pixels, ``valid_hw`` (B, 2) and
    the identity ``student_affine`` (B, 4), all on ``device``; with ``masks`` also ``mask_logits``
    (N, S/4, S/4) float32 for the N boxes of ``batch.boxes`` in their order; ``head_outputs`` for
    teachers that provide them."""

    def __init__(self, name: str, teacher: BaseTeacher, device: torch.device, masks: bool = False) -> None:
        if masks and not getattr(teacher, "can_segment", False):
            raise ConfigError(f"teachers.{name}: mask logits were asked of the "
                              f"{getattr(teacher, 'family', type(teacher).__name__)} teacher, which cannot be prompted "
                              f"for masks; teachers that can: {', '.join(segmenting_teachers())}.")
        self.name = name
        self.teacher = teacher
        self.device = device
        self.masks = bool(masks)
        self.channels_last = teacher.device.type == "cuda"  # NHWC feeds cuDNN's fast conv paths

    @torch.no_grad()
    def targets(self, batch: Batch) -> TeacherTargets:
        boxes = batch.views.content_box
        images = batch.images.to(self.teacher.device, non_blocking=True)
        tb = self.teacher.preprocess_crops(images, boxes.to(images.device))
        pixels = tb.pixels
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        heads = None
        if getattr(self.teacher, "provides_head_outputs", False):
            maps, heads = self.teacher.forward_with_heads(pixels)
        else:
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
            mask_logits=self._mask_logits(batch, maps, aff) if self.masks else None,
            head_outputs=heads,
        )

    def _mask_logits(self, batch: Batch, maps: Dict[str, torch.Tensor], affine: torch.Tensor) -> MaskLogits:
        """The teacher prompted with ``batch.boxes``: normalised canvas cx, cy, w, h -> canvas x1, y1, x2, y2
        pixels -> teacher pixels by ``affine`` (B, 4) (canvas -> teacher)."""
        det = batch.boxes
        h, w = batch.images.shape[-2:]
        idx = det.batch_idx.to(self.device).long()
        b = det.bboxes.to(device=self.device, dtype=torch.float32).view(-1, 4)
        cx, cy, bw, bh = b.unbind(1)
        xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], dim=1)
        a = affine[idx]  # (N, 4): (sx, sy, ox, oy) of each box's image
        scale, shift = a[:, [0, 1, 0, 1]], a[:, [2, 3, 2, 3]]
        prompts = xyxy * scale + shift
        # a mirrored map (sx < 0) swaps the x corners: keep x1 <= x2
        prompts = torch.stack([torch.minimum(prompts[:, 0], prompts[:, 2]), prompts[:, 1],
                               torch.maximum(prompts[:, 0], prompts[:, 2]), prompts[:, 3]], dim=1)
        logits = self.teacher.mask_logits(maps, prompts.to(self.teacher.device), idx.to(self.teacher.device))
        return MaskLogits(logits=logits.to(self.device, non_blocking=True).float(), batch_idx=idx,
                          label_index=det.label_index.to(self.device).long(),
                          cls=det.cls.to(self.device).view(-1).long(),
                          boxes=prompts)


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
