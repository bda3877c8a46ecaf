"""Typed records that travel from a dataset to the training step: one sample, one batch.

A dataset describes what the student sees (the image, its view geometry, its task targets); it
knows nothing of teachers. Teacher targets travel beside these records
(:mod:`vfmkd.distillation.targets`), attached by the distillation layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Sequence, Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class ViewGeometry:
    """How one student canvas was made from its original image.

    ``matrix`` (2, 3) float64: original pixel (x, y, 1) -> canvas pixel (continuous coordinates,
    pixel i spans [i, i + 1)). ``affine`` (sx, sy, ox, oy): the same map per axis (``sx < 0`` when
    mirrored); for a rotated view the axis-aligned part only, kept for shapes (such a view is never
    matched to a cached grid). ``content_box`` (x1, y1, x2, y2) integer canvas pixels holding image
    content (what a live teacher is shown). ``orig_hw`` (h, w) of the original image.
    """

    matrix: np.ndarray
    affine: Tuple[float, float, float, float]
    content_box: Tuple[int, int, int, int]
    orig_hw: Tuple[int, int]
    flipped: bool = False
    rotated: bool = False
    cropped: bool = False  # part of the image falls outside the canvas


@dataclass
class BoxTargets:
    """Detection targets of one image on its canvas: ``cls`` (n,) float class ids, ``boxes`` (n, 4)
    cx, cy, w, h normalised to the canvas."""

    cls: torch.Tensor
    boxes: torch.Tensor


@dataclass
class Sample:
    """One dataset item: ``image`` (3, S, S) float in [0, 1], its id, view and task targets
    (``boxes`` now; instance masks and semantic maps join as further optional fields)."""

    image: torch.Tensor
    image_id: str
    view: ViewGeometry
    boxes: BoxTargets


@dataclass
class BatchViews:
    """The views of a batch. ``affine`` (B, 4) float32; ``matrix`` (B, 2, 3) float64;
    ``content_box`` (B, 4) int64; ``orig_hw`` (B, 2) int64; ``flipped``/``rotated``/``cropped`` (B,) bool."""

    affine: torch.Tensor
    matrix: torch.Tensor
    content_box: torch.Tensor
    orig_hw: torch.Tensor
    flipped: torch.Tensor
    rotated: torch.Tensor
    cropped: torch.Tensor

    @classmethod
    def stack(cls, views: Sequence[ViewGeometry]) -> "BatchViews":
        return cls(
            affine=torch.tensor([v.affine for v in views], dtype=torch.float32),
            matrix=torch.from_numpy(np.stack([np.asarray(v.matrix, np.float64) for v in views])),
            content_box=torch.tensor([v.content_box for v in views], dtype=torch.int64),
            orig_hw=torch.tensor([v.orig_hw for v in views], dtype=torch.int64),
            flipped=torch.tensor([v.flipped for v in views], dtype=torch.bool),
            rotated=torch.tensor([v.rotated for v in views], dtype=torch.bool),
            cropped=torch.tensor([v.cropped for v in views], dtype=torch.bool),
        )

    def view(self, i: int) -> ViewGeometry:
        """The view of batch item ``i``."""
        return ViewGeometry(
            matrix=self.matrix[i].cpu().numpy(), affine=tuple(self.affine[i].tolist()),  # type: ignore[arg-type]
            content_box=tuple(int(v) for v in self.content_box[i].tolist()),  # type: ignore[arg-type]
            orig_hw=tuple(int(v) for v in self.orig_hw[i].tolist()),  # type: ignore[arg-type]
            flipped=bool(self.flipped[i]), rotated=bool(self.rotated[i]), cropped=bool(self.cropped[i]),
        )

    def __len__(self) -> int:
        return int(self.affine.shape[0])


@dataclass
class DetectionBatch:
    """Boxes of a batch in ultralytics' ``v8DetectionLoss`` format: ``cls`` (N, 1) float,
    ``bboxes`` (N, 4) normalised cx, cy, w, h, ``batch_idx`` (N,) float image index."""

    cls: torch.Tensor
    bboxes: torch.Tensor
    batch_idx: torch.Tensor

    @classmethod
    def stack(cls, targets: Sequence[BoxTargets]) -> "DetectionBatch":
        return cls(
            cls=torch.cat([t.cls for t in targets]).float().view(-1, 1),
            bboxes=torch.cat([t.boxes for t in targets]).float().view(-1, 4),
            batch_idx=torch.cat([torch.full((len(t.cls),), float(i)) for i, t in enumerate(targets)]),
        )

    def to(self, device: torch.device) -> "DetectionBatch":
        return DetectionBatch(*(t.to(device, non_blocking=True) for t in (self.cls, self.bboxes, self.batch_idx)))

    def as_loss_input(self) -> dict:
        """The mapping ultralytics' loss reads (its API, not ours, is keyed by strings)."""
        return {"cls": self.cls, "bboxes": self.bboxes, "batch_idx": self.batch_idx}

    def of_image(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(n,) class ids and (n, 4) normalised cx, cy, w, h of batch item ``i``."""
        keep = self.batch_idx == i
        return self.cls[keep].view(-1), self.bboxes[keep]


@dataclass
class Batch:
    """A collated batch: ``images`` (B, 3, S, S), ``image_ids``, ``views`` and ``boxes``."""

    images: torch.Tensor
    image_ids: List[str]
    views: BatchViews
    boxes: DetectionBatch = field(repr=False)

    def to(self, device: torch.device) -> "Batch":
        """Images and targets on ``device``; the views stay on the CPU (geometry is decided there)."""
        return replace(self, images=self.images.to(device, non_blocking=True), boxes=self.boxes.to(device))

    def __len__(self) -> int:
        return int(self.images.shape[0])


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a :class:`Batch`."""
    return Batch(
        images=torch.stack([s.image for s in samples]),
        image_ids=[s.image_id for s in samples],
        views=BatchViews.stack([s.view for s in samples]),
        boxes=DetectionBatch.stack([s.boxes for s in samples]),
    )
