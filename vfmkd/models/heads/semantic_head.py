"""Semantic segmentation head: a light FPN-style fusion of the neck levels into class logits."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Conv

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS
from vfmkd.models.fusion import WeightedFusion, check_fusion
from vfmkd.models.heads.base import BaseHead

OUTPUT_STRIDES = (4, 8)


class FPNFusion(nn.Module):
    """Every input level through a 1x1 lateral conv to ``channels``, bilinearly resized to the grid
    of stride ``output_stride`` (P3 stays, P4 x2, P5 x4; stride 4 adds one more x2), merged by the
    neck's fusion (:class:`~vfmkd.models.fusion.WeightedFusion`: ``learnable`` fast normalised fusion,
    ``sum`` or ``avg``), then a 3x3 Conv-BN-SiLU. (B, channels, S/output_stride, S/output_stride)."""

    def __init__(self, in_specs: Sequence[FeatureSpec], channels: int, output_stride: int,
                 fusion: str = "learnable") -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.level_names = [s.name for s in in_specs]
        self.strides = [s.stride for s in in_specs]
        self.output_stride = output_stride
        self.lateral = nn.ModuleList(nn.Conv2d(s.channels, channels, 1) for s in in_specs)
        self.merge = WeightedFusion(len(self.level_names), check_fusion(fusion, "semantic_head.fusion"))
        self.fuse = Conv(channels, channels, 3)

    def fusion_inputs(self) -> Dict[str, List[str]]:
        """Fusion node -> its input level names, in the order of :meth:`fusion_weights`."""
        return {"merge": list(self.level_names)}

    @torch.no_grad()
    def fusion_weights(self) -> Dict[str, List[float]]:
        """Fusion node -> its normalised weights (learnable: relu(p)/(ε+Σrelu(p)); sum: 1s; avg: 1/n)."""
        return {"merge": [round(float(w), 6) for w in self.merge.weights()]}

    def forward(self, feats: Dict[str, torch.Tensor]) -> torch.Tensor:
        first = feats[self.level_names[0]]
        size = (first.shape[-2] * self.strides[0] // self.output_stride,
                first.shape[-1] * self.strides[0] // self.output_stride)
        maps = []
        for name, lateral in zip(self.level_names, self.lateral):
            x = lateral(feats[name])
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            maps.append(x)
        return self.fuse(self.merge(maps))


@HEADS.register("semantic_head")
class SemanticHead(BaseHead):
    """Class logits (B, num_classes, S/output_stride, S/output_stride) from the neck levels
    (:class:`FPNFusion` then a 1x1 classifier). ``num_classes`` counts index 0 (unlabeled, ignored
    by the loss). ``fusion``: how the levels merge (``learnable``, as the ``fusion_fpn`` neck; ``sum``
    or ``avg``); its weights are logged per epoch (:meth:`fusion_weights`). Same output in train and
    eval mode; the loss and the scorer upsample it."""

    task = "semantic"

    def __init__(self, in_specs: Sequence[FeatureSpec], num_classes: int, channels: int = 64,
                 output_stride: int = 8, fusion: str = "learnable") -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.output_stride = num_classes, output_stride
        self.fusion = FPNFusion(in_specs, channels, output_stride, fusion)
        self.level_names = self.fusion.level_names
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def fusion_inputs(self) -> Dict[str, List[str]]:
        return self.fusion.fusion_inputs()

    def fusion_weights(self) -> Dict[str, List[float]]:
        return self.fusion.fusion_weights()

    def forward(self, feats: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.fusion(feats))
