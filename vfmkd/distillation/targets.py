"""What a teacher contributes to one training step, whether read from its cache or computed live."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Mapping, Optional, Sequence, Union

import torch

from vfmkd.datasets.cache_codec import dequantize


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
        return dequantize(*(t.to(device, non_blocking=True) for t in (self.values, self.scale, self.channel_scale))).float()


FeatureMap = Union[torch.Tensor, QuantizedMap]


def _stack(maps: Sequence[FeatureMap]) -> FeatureMap:
    if isinstance(maps[0], QuantizedMap):
        return QuantizedMap(*(torch.stack([getattr(m, k) for m in maps]) for k in ("values", "scale", "channel_scale")))
    return torch.stack(list(maps))  # type: ignore[arg-type]


@dataclass
class TeacherTargets:
    """One teacher's targets for a batch (or, unbatched, for one image).

    ``features``: name -> (B, C, h, w) map covering the teacher's whole ``input_size`` canvas (float
    or :class:`QuantizedMap`). ``affine`` (B, 4): reference-frame pixel -> teacher input pixel;
    ``valid_hw`` (B, 2): the unpadded region of the teacher canvas. ``student_affine`` (B, 4):
    reference frame -> student canvas; ``None`` when the reference frame is the original image and
    the batch's own view affines apply (cached targets). ``mask_logits`` / ``class_logits``: room
    for teachers that provide output logits (segmentation).
    """

    features: Dict[str, FeatureMap]
    affine: torch.Tensor
    valid_hw: torch.Tensor
    input_size: int
    student_affine: Optional[torch.Tensor] = None
    mask_logits: Optional[torch.Tensor] = None
    class_logits: Optional[torch.Tensor] = None

    def feature(self, name: str, device: torch.device) -> torch.Tensor:
        """Map ``name`` as float32 on ``device`` whatever its storage."""
        fmap = self.features[name]
        if isinstance(fmap, QuantizedMap):
            return fmap.to_float(device)
        return fmap.to(device, non_blocking=True).float()

    def to_float(self, device: torch.device) -> "TeacherTargets":
        """Every map as float32 on ``device``."""
        return replace(self, features={k: self.feature(k, device) for k in self.features})

    def is_summary(self, name: str) -> bool:
        """A 1x1 map (e.g. a CLS token) summarises the whole image."""
        return tuple(self.features[name].shape[-2:]) == (1, 1)

    @classmethod
    def collate(cls, entries: Sequence["TeacherTargets"]) -> "TeacherTargets":
        """Stack unbatched per-image targets into a batch."""
        first = entries[0]
        return cls(
            features={k: _stack([e.features[k] for e in entries]) for k in first.features},
            affine=torch.stack([e.affine for e in entries]),
            valid_hw=torch.stack([e.valid_hw for e in entries]),
            input_size=first.input_size,
        )


def from_cache_entry(entry: Mapping[str, object]) -> TeacherTargets:
    """A :meth:`FeatureCacheReader.read` result (``dequantize=False``) as targets of one image."""
    feats: Dict[str, FeatureMap] = {}
    for name, value in entry["features"].items():  # type: ignore[union-attr]
        feats[name] = QuantizedMap(**value) if isinstance(value, dict) else value
    return TeacherTargets(features=feats, affine=entry["affine"], valid_hw=entry["valid_hw"],  # type: ignore[arg-type]
                          input_size=int(entry["input_size"]))  # type: ignore[arg-type]
