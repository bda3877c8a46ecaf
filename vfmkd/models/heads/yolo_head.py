"""YOLOv8 detection head: ultralytics' ``Detect`` in its v8 (legacy) form."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from ultralytics.nn.modules import Detect
from ultralytics.utils.torch_utils import initialize_weights

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS
from vfmkd.models.heads.base import BaseHead


class V8Detect(Detect):
    """ultralytics' Detect with YOLOv8's plain-conv classification branch. ultralytics selects it
    with a class attribute (its model parser flips it on the shared class); a subclass keeps the
    choice local."""

    legacy = True


@HEADS.register("yolo_head")
class YOLOv8DetectHead(BaseHead):
    """Anchor-free decoupled head with DFL box regression.

    Training: ``forward({"P3": ..., "P4": ..., "P5": ...})`` returns ultralytics' raw dict (``boxes``
    (B, 4*reg_max, A), ``scores`` (B, num_classes, A), ``feats``) that ``v8DetectionLoss`` consumes.
    Eval: a tuple whose first item is (B, 4 + num_classes, A): decoded xywh boxes in input pixels
    and class probabilities.
    """

    task = "detection"

    def __init__(self, in_specs: Sequence[FeatureSpec], num_classes: int = 80, reg_max: int = 16) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.level_names = [s.name for s in in_specs]
        self.detect = V8Detect(nc=num_classes, reg_max=reg_max, ch=tuple(s.channels for s in in_specs))
        self.detect.stride = torch.tensor([float(s.stride) for s in in_specs])
        self.detect.bias_init()
        initialize_weights(self)  # YOLOv8's BatchNorm settings, as ultralytics builds it

    def forward(self, feats: Dict[str, torch.Tensor]):
        return self.detect([feats[n] for n in self.level_names])
