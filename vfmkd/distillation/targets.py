"""What a teacher contributes to one training step, whether read from its cache or computed live."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import default_collate

from vfmkd.cache.codec import dequantize


@dataclass
class QuantizedMap:
    """An int8-cached map, kept int8 through the data loader: ``values`` (..., C, h, w) int8,
    ``scale`` (..., h, w) and ``channel_scale`` (..., C) float32 (see :mod:`cache_codec`)."""

    values: torch.Tensor
    scale: torch.Tensor
    channel_scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def to_float(self, device: torch.device) -> torch.Tensor:
        """Dequantised float32 on ``device`` (the transfer moves 1 byte per value, not 2 or 4)."""
        return dequantize(
            *(t.to(device, non_blocking=True) for t in (self.values, self.scale, self.channel_scale))
        ).float()


FeatureMap = Union[torch.Tensor, QuantizedMap]


@dataclass
class MaskLogits:
    """Box-prompted teacher mask logits of a batch (or, unbatched, of one image).

    ``logits`` (N, S/4, S/4): float (live passes, float16 caches), or int8 with ``scale`` (N,)
    float32 per mask (int8 caches: logit = q * scale; :meth:`to_float` decodes). ``batch_idx`` (N,)
    int64 image of each mask; ``label_index`` (N,) int64 row of the prompt box in the image's
    detection label file (``BoxTargets.label_index``); ``cls`` (N,) int64 detection class ids;
    ``boxes`` (N, 4) float32 x1, y1, x2, y2 prompt boxes in teacher pixels (or None). Frame: the
    teacher canvas of the same targets' features (their ``affine``, ``valid_hw``, ``input_size``),
    stride 4 in teacher pixels.
    """

    logits: torch.Tensor
    batch_idx: torch.Tensor
    label_index: torch.Tensor
    cls: torch.Tensor
    scale: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def to_float(self, device: torch.device) -> MaskLogits:
        """Every tensor on ``device``, ``logits`` as float32 (int8 dequantised there: 1 byte per value moves)."""
        logits = self.logits.to(device, non_blocking=True).float()
        if self.scale is not None:
            logits = logits.mul_(self.scale.to(device, non_blocking=True).float()[:, None, None])
        return MaskLogits(logits=logits, batch_idx=self.batch_idx.to(device, non_blocking=True),
                          label_index=self.label_index.to(device, non_blocking=True),
                          cls=self.cls.to(device, non_blocking=True),
                          boxes=None if self.boxes is None else self.boxes.to(device, non_blocking=True).float())

    def of_image(self, i: int) -> MaskLogits:
        """The masks of batch item ``i`` (``batch_idx`` kept)."""
        keep = self.batch_idx == i
        return MaskLogits(logits=self.logits[keep], batch_idx=self.batch_idx[keep], label_index=self.label_index[keep],
                          cls=self.cls[keep], scale=None if self.scale is None else self.scale[keep],
                          boxes=None if self.boxes is None else self.boxes[keep])

    @classmethod
    def cat(cls, parts: Sequence[MaskLogits], positions: Optional[Sequence[int]] = None) -> MaskLogits:
        """Concatenate per-image records; ``positions`` (default 0, 1, ...) become their ``batch_idx``."""
        if not parts:
            raise ValueError("MaskLogits.cat needs at least one record")
        if len({p.quantized for p in parts}) > 1:
            raise ValueError("MaskLogits.cat: int8 and float mask logits cannot be mixed in one batch")
        pos = range(len(parts)) if positions is None else positions
        with_boxes = all(p.boxes is not None for p in parts)
        return cls(
            logits=torch.cat([p.logits for p in parts]),
            batch_idx=torch.cat([torch.full((len(p),), int(i), dtype=torch.int64, device=p.logits.device)
                                 for p, i in zip(parts, pos)]),
            label_index=torch.cat([p.label_index.to(torch.int64) for p in parts]),
            cls=torch.cat([p.cls.to(torch.int64) for p in parts]),
            scale=torch.cat([p.scale for p in parts]) if parts[0].quantized else None,  # type: ignore[misc]
            boxes=torch.cat([p.boxes for p in parts]) if with_boxes else None,  # type: ignore[misc]
        )


def _stack_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` through torch's own ``default_collate``: inside a DataLoader worker it stacks straight
    into shared memory, so the batch crosses to the main process without a second copy (a plain stack
    is copied into shared memory again when the worker sends it)."""
    return default_collate(list(tensors))


def _stack(maps: Sequence[FeatureMap]) -> FeatureMap:
    if isinstance(maps[0], QuantizedMap):
        return QuantizedMap(*(_stack_tensors([getattr(m, k) for m in maps]) for k in ("values", "scale",
                                                                                       "channel_scale")))
    return _stack_tensors(maps)  # type: ignore[arg-type]


@dataclass
class TeacherTargets:
    """One teacher's targets for a batch (or, unbatched, for one image).

    ``features``: name -> (B, C, h, w) map covering the teacher's whole ``input_size`` canvas (float
    or :class:`QuantizedMap`). ``affine`` (B, 4): reference-frame pixel -> teacher input pixel;
    ``valid_hw`` (B, 2): the unpadded region of the teacher canvas. ``student_affine`` (B, 4):
    reference frame -> student canvas; ``None`` when the reference frame is the original image and
    the batch's own view affines apply (cached targets). ``mask_logits``: the teacher's box-prompted
    :class:`MaskLogits` (teachers that can segment; None when not asked for). ``head_outputs``: raw
    training outputs of a vfmkd teacher's heads keyed by head name, on the student canvas (teachers
    with ``provides_head_outputs``). ``class_logits``: room for other output logits.
    """

    features: Dict[str, FeatureMap]
    affine: torch.Tensor
    valid_hw: torch.Tensor
    input_size: int
    student_affine: Optional[torch.Tensor] = None
    mask_logits: Optional[MaskLogits] = None
    class_logits: Optional[torch.Tensor] = None
    head_outputs: Optional[Dict[str, Any]] = None

    def feature(self, name: str, device: torch.device) -> torch.Tensor:
        """Map ``name`` as float32 on ``device`` whatever its storage."""
        fmap = self.features[name]
        if isinstance(fmap, QuantizedMap):
            return fmap.to_float(device)
        return fmap.to(device, non_blocking=True).float()

    def to_float(self, device: torch.device) -> TeacherTargets:
        """Every map (and the mask logits) as float32 on ``device``."""
        masks = None if self.mask_logits is None else self.mask_logits.to_float(device)
        return replace(self, features={k: self.feature(k, device) for k in self.features}, mask_logits=masks)

    def is_summary(self, name: str) -> bool:
        """A 1x1 map (e.g. a CLS token) summarises the whole image."""
        return tuple(self.features[name].shape[-2:]) == (1, 1)

    @classmethod
    def collate(cls, entries: Sequence[TeacherTargets]) -> TeacherTargets:
        """Stack unbatched per-image targets into a batch; mask logits are concatenated with
        ``batch_idx`` = the image's position (all entries have them, or none)."""
        first = entries[0]
        with_masks = [e.mask_logits is not None for e in entries]
        if any(with_masks) and not all(with_masks):
            raise ValueError("TeacherTargets.collate: some entries have mask logits and some do not")
        return cls(
            features={k: _stack([e.features[k] for e in entries]) for k in first.features},
            affine=_stack_tensors([e.affine for e in entries]),
            valid_hw=_stack_tensors([e.valid_hw for e in entries]),
            input_size=first.input_size,
            mask_logits=(MaskLogits.cat([e.mask_logits for e in entries])  # type: ignore[misc]
                         if all(with_masks) else None),
        )


def from_cache_entry(entry: Mapping[str, object]) -> TeacherTargets:
    """A :meth:`FeatureCacheReader.read` result (``dequantize=False``) as targets of one image; a
    cache with mask logits gives :class:`MaskLogits` (``batch_idx`` 0, int8 kept with its scales)."""
    feats: Dict[str, FeatureMap] = {}
    for name, value in entry["features"].items():  # type: ignore[union-attr]
        feats[name] = QuantizedMap(**value) if isinstance(value, dict) else value
    masks = entry.get("masks")
    mask_logits = None
    if masks is not None:
        m: Mapping[str, torch.Tensor] = masks  # type: ignore[assignment]
        n = int(m["logits"].shape[0])
        mask_logits = MaskLogits(logits=m["logits"], batch_idx=torch.zeros(n, dtype=torch.int64),
                                 label_index=m["label_index"],
                                 cls=m["cls"], scale=m.get("scale"), boxes=m.get("boxes"))
    return TeacherTargets(features=feats, affine=entry["affine"], valid_hw=entry["valid_hw"],  # type: ignore[arg-type]
                          input_size=int(entry["input_size"]), mask_logits=mask_logits)
