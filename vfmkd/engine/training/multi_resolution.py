"""Multi-resolution training (``data.img_sizes``): each training batch's student input size is drawn
from a list, so the student learns every resolution's "mode" at once (RADIOv2.5's remedy for the
resolution mode switch). The dataset still letterboxes to ``data.img_size``; the drawn size rescales
the whole batch (:func:`rescale_batch`): the canvas, the views' affines and content boxes, and the
dense labels. Teacher targets need nothing of their own: the cached maps reach the student grid
through the views' affines (:func:`vfmkd.distillation.geometry.resample_to_student`), a live teacher
sees the rescaled canvas's content box.

The draw is a pure function of (seed, step): the same size on every rank (DDP needs equal shapes only
per rank, but equal sizes keep step times even) and after a resume.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vfmkd.core.errors import ConfigError
from vfmkd.datasets.records import Batch, BatchViews

STREAM = 0x3E5  # separates this (seed, step) stream from teacher dropping's and offline_ratio's


def check_img_sizes(sizes: Sequence[int], stride: int = 32) -> list:
    """``data.img_sizes`` as a list of ints, each a positive multiple of ``stride`` (the student's largest)."""
    out = [int(s) for s in sizes]
    bad = [s for s in out if s <= 0 or s % stride]
    if bad:
        raise ConfigError(f"data.img_sizes: {bad} are not positive multiples of {stride} (the student's largest "
                          f"stride); e.g. [256, 320, 416, 512]")
    return out


class ResolutionSampler:
    """``size_of(step)``: the student input size of training step ``step`` (None: no multi-resolution)."""

    def __init__(self, sizes: Sequence[int], seed: int) -> None:
        self.sizes, self.seed = check_img_sizes(sizes), int(seed)

    def size_of(self, step: int) -> Optional[int]:
        if not self.sizes:
            return None
        return self.sizes[int(np.random.default_rng((self.seed, int(step), STREAM)).integers(len(self.sizes)))]


    def rescale(self, step: int, batch: Batch) -> Batch:
        """``batch`` at step ``step``'s size (unchanged without multi-resolution)."""
        size = self.size_of(step)
        return batch if size is None else rescale_batch(batch, size)

    def items(self, items: Iterable[Any], first_step: int) -> Iterator[Any]:
        """Loader items (:class:`~vfmkd.distillation.cached.DistillBatch`) of steps first_step, first_step + 1...
        with their batches rescaled, before any teacher sees them (a live pass must see the student's canvas)."""
        if not self.sizes:
            yield from items
            return
        for step, item in enumerate(items, start=first_step):
            yield replace(item, batch=self.rescale(step, item.batch))


def rescale_batch(batch: Batch, size: int) -> Batch:
    """``batch`` with its (B, 3, S, S) canvas resized to (B, 3, size, size): images bilinear (antialiased when
    shrinking), views' affines and matrices x size/S, content boxes rounded, semantic/binary labels and
    instance masks nearest-neighbour. Normalised boxes are unchanged. Returns ``batch`` when size == S."""
    s = int(batch.images.shape[-1])
    if size == s:
        return batch
    r = size / s
    images = F.interpolate(batch.images.float(), size=(size, size), mode="bilinear", align_corners=False,
                           antialias=size < s).to(batch.images.dtype)
    v = batch.views
    views = BatchViews(affine=v.affine * r, matrix=v.matrix * r,
                       content_box=torch.round(v.content_box.double() * r).long().clamp_(0, size),
                       orig_hw=v.orig_hw, flipped=v.flipped, rotated=v.rotated, cropped=v.cropped)
    instances = batch.instances
    if instances is not None:
        side = size // 4
        masks = instances.masks
        masks = (F.interpolate(masks[:, None].float(), size=(side, side), mode="nearest")[:, 0] if len(masks)
                 else masks.new_zeros((0, side, side)))
        instances = replace(instances, masks=masks)
    return replace(batch, images=images, views=views, instances=instances,
                   semantic=_nearest(batch.semantic, size), binary=_nearest(batch.binary, size))


def _nearest(labels: Optional[torch.Tensor], size: int) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    return F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(labels.dtype)
