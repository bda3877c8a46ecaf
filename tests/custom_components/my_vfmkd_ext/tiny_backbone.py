"""An example user backbone: three strided conv stages. Registered from outside the vfmkd package."""
from __future__ import annotations

from collections import OrderedDict
from typing import Tuple

import torch
from torch import nn

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import BACKBONES
from vfmkd.models.backbones.base import BaseBackbone


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


@BACKBONES.register("tiny_convnet")
class TinyConvNet(BaseBackbone):
    """(B, 3, H, W) -> P3 (B, width, H/8, W/8), P4 (B, 2*width, H/16, W/16), P5 (B, 4*width, H/32, W/32)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(_stage(3, width, 2), _stage(width, width, 2), _stage(width, width, 2))
        self.p4 = _stage(width, 2 * width, 2)
        self.p5 = _stage(2 * width, 4 * width, 2)
        self._specs = (FeatureSpec("P3", width, 8), FeatureSpec("P4", 2 * width, 16), FeatureSpec("P5", 4 * width, 32))

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        p3 = self.stem(x)
        p4 = self.p4(p3)
        return OrderedDict(P3=p3, P4=p4, P5=self.p5(p4))
