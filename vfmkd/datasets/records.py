"""Typed records that travel from a dataset to the training step: one sample, one batch.

A dataset describes what the student sees (the image, its view geometry, its task targets); it
knows nothing of teachers. Teacher targets travel beside these records
(:mod:`vfmkd.distillation.targets`), attached by the distillation layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import default_collate


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


LABEL_KINDS = ("instances", "semantic", "binary")  # the optional per-pixel label kinds of a sample


@dataclass
class BoxTargets:
    """Detection targets of one image on its canvas: ``cls`` (n,) float class ids, ``boxes`` (n, 4)
    cx, cy, w, h normalised to the canvas, ``label_index`` (n,) int64: the row of each box in the
    image's detection label file (after :func:`~vfmkd.datasets.coco_yolo.parse_labels` drops
    duplicates; rows dropped by augmentation leave gaps). None means rows 0..n-1."""

    cls: torch.Tensor
    boxes: torch.Tensor
    label_index: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.label_index is None:
            self.label_index = torch.arange(len(self.cls), dtype=torch.int64)


@dataclass
class InstanceTargets:
    """Instance masks of one image on its canvas (an image with instance labels; n may be 0).

    ``cls`` (n,) float detection class ids 0..C-1 (panoptic ids mapped by name), ``boxes`` (n, 4)
    normalised cx, cy, w, h of each polygon after the view (clipped to the canvas), ``masks``
    (n, S/4, S/4) uint8 {0, 1} (ultralytics' mask_ratio 4), ``label_index`` (n,) int64: the
    detection-label row of the same class with the best box IoU >= 0.5, else -1.
    """

    cls: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    label_index: torch.Tensor


@dataclass
class Sample:
    """One dataset item: ``image`` (3, S, S) float in [0, 1], its id, view and task targets.

    ``instances``: None when the image has no instance labels (or they were not asked for).
    ``semantic`` (S, S) int64 contiguous semantic class index, 0 = unlabeled/ignore (also the
    padding); None when the image has no semantic mask or it was not asked for. ``binary`` (S, S)
    uint8 {0, 1}, 255 = ignore (padding); None likewise. ``kinds``: the label kinds (of
    :data:`LABEL_KINDS`) the dataset was asked for, so a batch of only unlabelled images still
    carries those fields (all ignore) instead of None. ``labelled``: False for an image without any
    labels (an unlabelled folder): its empty ``boxes`` mean "unknown", not "no objects".
    """

    image: torch.Tensor
    image_id: str
    view: ViewGeometry
    boxes: BoxTargets
    instances: Optional[InstanceTargets] = None
    semantic: Optional[torch.Tensor] = None
    binary: Optional[torch.Tensor] = None
    kinds: Tuple[str, ...] = ()
    labelled: bool = True


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
    def stack(cls, views: Sequence[ViewGeometry]) -> BatchViews:
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


def _rank_in_image(batch_idx: torch.Tensor) -> torch.Tensor:
    """(N,) int64 position of each row among the rows of its image (rows are grouped by image)."""
    idx = batch_idx.view(-1).long()
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=idx.device)
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    pos = torch.arange(idx.numel(), device=idx.device)
    start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    return pos - start


@dataclass
class DetectionBatch:
    """Boxes of a batch in ultralytics' ``v8DetectionLoss`` format: ``cls`` (N, 1) float,
    ``bboxes`` (N, 4) normalised cx, cy, w, h, ``batch_idx`` (N,) float image index, plus
    ``label_index`` (N,) int64: each box's row in its image's detection label file."""

    cls: torch.Tensor
    bboxes: torch.Tensor
    batch_idx: torch.Tensor
    label_index: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.label_index is None:  # built without it: rows in label-file order
            self.label_index = _rank_in_image(self.batch_idx)

    @classmethod
    def stack(cls, targets: Sequence[BoxTargets]) -> DetectionBatch:
        return cls(
            cls=torch.cat([t.cls for t in targets]).float().view(-1, 1),
            bboxes=torch.cat([t.boxes for t in targets]).float().view(-1, 4),
            batch_idx=torch.cat([torch.full((len(t.cls),), float(i)) for i, t in enumerate(targets)]),
            label_index=torch.cat([t.label_index.long().view(-1) for t in targets]),  # type: ignore[union-attr]
        )

    def to(self, device: torch.device) -> DetectionBatch:
        return DetectionBatch(*(t.to(device, non_blocking=True)  # type: ignore[union-attr]
                                for t in (self.cls, self.bboxes, self.batch_idx, self.label_index)))

    def as_loss_input(self) -> dict:
        """The mapping ultralytics' loss reads (its API, not ours, is keyed by strings)."""
        return {"cls": self.cls, "bboxes": self.bboxes, "batch_idx": self.batch_idx}

    def of_image(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(n,) class ids and (n, 4) normalised cx, cy, w, h of batch item ``i``."""
        keep = self.batch_idx == i
        return self.cls[keep].view(-1), self.bboxes[keep]


@dataclass
class InstanceBatch:
    """Instance targets of a batch in ultralytics' ``v8SegmentationLoss`` format (``overlap_mask``
    False: one mask per instance). ``cls`` (N, 1) float detection class ids, ``bboxes`` (N, 4)
    normalised cx, cy, w, h, ``batch_idx`` (N,) float image index, ``masks`` (N, S/4, S/4) float
    {0, 1}, ``label_index`` (N,) int64 matching detection-label row (-1: none), ``labelled`` (B,)
    bool: the image has instance labels (an unlabelled image has no rows and must not count as
    "no objects" in a mask loss). Rows of one image are contiguous and in image order."""

    cls: torch.Tensor
    bboxes: torch.Tensor
    batch_idx: torch.Tensor
    masks: torch.Tensor
    label_index: torch.Tensor
    labelled: torch.Tensor

    @classmethod
    def stack(cls, targets: Sequence[Optional[InstanceTargets]], mask_hw: Tuple[int, int]) -> InstanceBatch:
        """``targets`` per image (None: unlabelled); ``mask_hw`` the mask size (S/4, S/4)."""
        present = [t for t in targets if t is not None]
        if present:
            mask_hw = tuple(present[0].masks.shape[-2:])  # type: ignore[assignment]
        return cls(
            cls=torch.cat([t.cls.float().view(-1) for t in present] or [torch.zeros(0)]).view(-1, 1),
            bboxes=torch.cat([t.boxes.float().view(-1, 4) for t in present] or [torch.zeros(0, 4)]),
            batch_idx=torch.cat(
                [torch.full((len(t.cls),), float(i)) for i, t in enumerate(targets) if t is not None]
                or [torch.zeros(0)]
            ),
            masks=torch.cat([t.masks.float().view(-1, *mask_hw) for t in present] or [torch.zeros(0, *mask_hw)]),
            label_index=torch.cat(
                [t.label_index.long().view(-1) for t in present] or [torch.zeros(0, dtype=torch.int64)]
            ),
            labelled=torch.tensor([t is not None for t in targets], dtype=torch.bool),
        )

    def to(self, device: torch.device) -> InstanceBatch:
        return InstanceBatch(*(t.to(device, non_blocking=True) for t in (
            self.cls, self.bboxes, self.batch_idx, self.masks, self.label_index, self.labelled)))

    def as_loss_input(self) -> dict:
        """The mapping ultralytics' ``v8SegmentationLoss`` reads (with ``overlap_mask=False``)."""
        return {"cls": self.cls, "bboxes": self.bboxes, "batch_idx": self.batch_idx, "masks": self.masks}

    def of_image(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n,) class ids, (n, 4) normalised cx, cy, w, h and (n, S/4, S/4) masks of batch item ``i``."""
        keep = self.batch_idx == i
        return self.cls[keep].view(-1), self.bboxes[keep], self.masks[keep]

    def __len__(self) -> int:
        return int(self.cls.shape[0])


@dataclass
class Batch:
    """A collated batch: ``images`` (B, 3, S, S), ``image_ids``, ``views`` and ``boxes``; and, when
    the dataset was asked for them, ``instances`` (:class:`InstanceBatch`), ``semantic`` (B, S, S)
    int64 (unlabelled images all 0 = ignore) and ``binary`` (B, S, S) uint8 (unlabelled images all
    255 = ignore). Those three are None when no sample carries (or was asked for) that kind.
    ``labelled`` (B,) bool: the image has labels; task losses skip the others (None: all labelled)."""

    images: torch.Tensor
    image_ids: List[str]
    views: BatchViews
    boxes: DetectionBatch = field(repr=False)
    instances: Optional[InstanceBatch] = field(default=None, repr=False)
    semantic: Optional[torch.Tensor] = field(default=None, repr=False)
    binary: Optional[torch.Tensor] = field(default=None, repr=False)
    labelled: Optional[torch.Tensor] = field(default=None, repr=False)

    def to(self, device: torch.device) -> Batch:
        """Images and targets on ``device``; the views stay on the CPU (geometry is decided there)."""
        return replace(
            self, images=self.images.to(device, non_blocking=True), boxes=self.boxes.to(device),
            instances=self.instances.to(device) if self.instances is not None else None,
            semantic=self.semantic.to(device, non_blocking=True) if self.semantic is not None else None,
            binary=self.binary.to(device, non_blocking=True) if self.binary is not None else None,
            labelled=self.labelled.to(device, non_blocking=True) if self.labelled is not None else None,
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _wants(samples: Sequence[Sample], kind: str) -> bool:
    return any(getattr(s, kind) is not None or kind in s.kinds for s in samples)


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a :class:`Batch`. A label kind that some sample carries (or that the
    dataset was asked for) is filled for every image: unlabelled images get semantic 0, binary 255
    and no instance rows (``instances.labelled`` False)."""
    size = tuple(samples[0].image.shape[-2:])
    semantic = binary = instances = None
    # torch's default_collate stacks a list of tensors, in a DataLoader worker straight into shared memory: the
    # batch then reaches the main process without a second copy (~39 MiB of images per batch of 8 at 640 px)
    if _wants(samples, "semantic"):
        semantic = default_collate([s.semantic.long() if s.semantic is not None
                                    else torch.zeros(size, dtype=torch.int64) for s in samples])
    if _wants(samples, "binary"):
        binary = default_collate([s.binary.to(torch.uint8) if s.binary is not None
                                  else torch.full(size, 255, dtype=torch.uint8) for s in samples])
    if _wants(samples, "instances"):
        instances = InstanceBatch.stack([s.instances for s in samples], (size[0] // 4, size[1] // 4))
    return Batch(
        images=default_collate([s.image for s in samples]),
        image_ids=[s.image_id for s in samples],
        views=BatchViews.stack([s.view for s in samples]),
        boxes=DetectionBatch.stack([s.boxes for s in samples]),
        instances=instances,
        semantic=semantic,
        binary=binary,
        labelled=torch.tensor([s.labelled for s in samples], dtype=torch.bool),
    )
