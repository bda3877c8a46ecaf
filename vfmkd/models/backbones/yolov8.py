"""YOLOv8 CSP-Darknet trunk built from ultralytics' own modules (Conv, C2f, SPPF)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, NamedTuple, Tuple

import torch
from torch import nn
from ultralytics.nn.modules import SPPF, C2f, Conv
from ultralytics.utils.ops import make_divisible
from ultralytics.utils.torch_utils import initialize_weights

from vfmkd.core.errors import ConfigError, did_you_mean
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import BACKBONES
from vfmkd.models.backbones.base import BaseBackbone


class YoloMultipliers(NamedTuple):
    """How one YOLOv8 variant sizes the base network (one row of ultralytics' ``scales``)."""

    depth: float  # multiplies C2f repeats
    width: float  # multiplies channels
    max_channels: int


# The variants of ultralytics' yolov8.yaml (its ``scales`` table): variant -> multipliers.
YOLOV8_VARIANTS: Dict[str, YoloMultipliers] = {
    "n": YoloMultipliers(0.33, 0.25, 1024),
    "s": YoloMultipliers(0.33, 0.50, 1024),
    "m": YoloMultipliers(0.67, 0.75, 768),
    "l": YoloMultipliers(1.00, 1.00, 512),
    "x": YoloMultipliers(1.00, 1.25, 512),
}


def yolo_channels(channels: int, m: YoloMultipliers) -> int:
    return int(make_divisible(min(channels, m.max_channels) * m.width, 8))


def yolo_repeats(repeats: int, m: YoloMultipliers) -> int:
    return max(round(repeats * m.depth), 1)


def resolve_variant(variant: str) -> YoloMultipliers:
    if variant not in YOLOV8_VARIANTS:
        raise ConfigError(f"unknown yolov8 variant '{variant}'.{did_you_mean(variant, YOLOV8_VARIANTS)} "
                          f"Choose from {', '.join(YOLOV8_VARIANTS)}.")
    return YOLOV8_VARIANTS[variant]


@BACKBONES.register("yolov8")
class YOLOv8Backbone(BaseBackbone):
    """YOLOv8 backbone. ``forward((B, 3, H, W))`` -> ``{"P3": (B, C3, H/8, W/8), "P4": (B, C4, H/16, W/16),
    "P5": (B, C5, H/32, W/32)}``; ``variant`` is one of n/s/m/l/x (ultralytics' scales), e.g. n gives
    C3/C4/C5 = 64/128/256.
    """

    def __init__(self, variant: str = "n", in_channels: int = 3) -> None:
        super().__init__()
        s = resolve_variant(variant)
        self.variant = variant
        c1, c2, c3, c4, c5 = (yolo_channels(c, s) for c in (64, 128, 256, 512, 1024))
        self.stem = nn.Sequential(Conv(in_channels, c1, 3, 2), Conv(c1, c2, 3, 2),
                                  C2f(c2, c2, yolo_repeats(3, s), True))
        self.stage3 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3, yolo_repeats(6, s), True))
        self.stage4 = nn.Sequential(Conv(c3, c4, 3, 2), C2f(c4, c4, yolo_repeats(6, s), True))
        sppf = SPPF(c5, c5, 5)
        # ultralytics' SPPF leaves cv1 unactivated (YOLO26); its YAML parser puts SiLU back for
        # YOLOv8's rows, and so do we: otherwise this is not YOLOv8 (pretrained weights misbehave).
        sppf.cv1.act = Conv.default_act
        self.stage5 = nn.Sequential(Conv(c4, c5, 3, 2), C2f(c5, c5, yolo_repeats(3, s), True), sppf)
        self._specs = (FeatureSpec("P3", c3, 8), FeatureSpec("P4", c4, 16), FeatureSpec("P5", c5, 32))
        initialize_weights(self)  # YOLOv8's BatchNorm (eps 1e-3, momentum 0.03): pretrained weights expect it

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        p3 = self.stage3(self.stem(x))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        return OrderedDict(P3=p3, P4=p4, P5=p5)
