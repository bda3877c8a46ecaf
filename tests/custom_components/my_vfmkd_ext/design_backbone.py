"""A user backbone written exactly to the design's guide: subclass ``BaseBackbone`` and implement
``forward``, ``get_feature_dims`` and ``get_feature_strides`` (``feature_specs()`` is derived)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import torch
from torch import nn

from vfmkd.core.registry import BACKBONES
from vfmkd.models.backbones.base import BaseBackbone


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


@BACKBONES.register("design_convnet")
class DesignConvNet(BaseBackbone):
    """(B, 3, H, W) -> C3 (B, w, H/8, W/8), C4 (B, 2w, H/16, W/16), C5 (B, 4w, H/32, W/32)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.width = width
        self.c3 = nn.Sequential(_down(3, width), _down(width, width), _down(width, width))
        self.c4 = _down(width, 2 * width)
        self.c5 = _down(2 * width, 4 * width)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c3 = self.c3(x)
        c4 = self.c4(c3)
        return OrderedDict(C3=c3, C4=c4, C5=self.c5(c4))

    def get_feature_dims(self) -> Dict[str, int]:
        return {"C3": self.width, "C4": 2 * self.width, "C5": 4 * self.width}

    def get_feature_strides(self) -> Dict[str, int]:
        return {"C3": 8, "C4": 16, "C5": 32}
