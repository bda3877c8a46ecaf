"""YOLOv8's PAN-FPN neck from ultralytics' modules, sized by the backbone it sits on."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Sequence, Tuple

import torch
from torch import nn
from ultralytics.nn.modules import C2f, Conv
from ultralytics.utils.torch_utils import initialize_weights

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import NECKS


@NECKS.register("yolov8_pafpn")
class YOLOv8PAFPN(nn.Module):
    """Top-down then bottom-up fusion of three levels.

    ``forward({"P3": (B, C3, H/8, W/8), "P4": ..., "P5": ...})`` returns the same levels with the
    same shapes (YOLOv8's head keeps the backbone's widths). ``in_specs`` comes from the backbone;
    ``depth`` is the C2f repeat count (1 for YOLOv8 n/s, 2 for m, 3 for l/x).
    """

    def __init__(self, in_specs: Sequence[FeatureSpec], depth: int = 1) -> None:
        super().__init__()
        if len(in_specs) != 3:
            raise ValueError(f"yolov8_pafpn fuses exactly three levels, the backbone gives "
                             f"{[s.name for s in in_specs]}: set model.backbone.strides to three, e.g. [8, 16, 32]")
        strides = [s.stride for s in in_specs]
        if strides[1] != 2 * strides[0] or strides[2] != 2 * strides[1]:
            raise ValueError(f"yolov8_pafpn needs levels at strides s, 2s, 4s; got {strides}")
        self._specs = tuple(in_specs)
        c3, c4, c5 = (s.channels for s in in_specs)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C2f(c5 + c4, c4, depth)
        self.td3 = C2f(c4 + c3, c3, depth)
        self.down3 = Conv(c3, c3, 3, 2)
        self.bu4 = C2f(c3 + c4, c4, depth)
        self.down4 = Conv(c4, c4, 3, 2)
        self.bu5 = C2f(c4 + c5, c5, depth)
        initialize_weights(self)  # YOLOv8's BatchNorm settings, as ultralytics builds it

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    def forward(self, feats: Dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        n3, n4, n5 = (s.name for s in self._specs)
        p3, p4, p5 = feats[n3], feats[n4], feats[n5]
        t4 = self.td4(torch.cat([self.up(p5), p4], 1))
        o3 = self.td3(torch.cat([self.up(t4), p3], 1))
        o4 = self.bu4(torch.cat([self.down3(o3), t4], 1))
        o5 = self.bu5(torch.cat([self.down4(o4), p5], 1))
        return OrderedDict([(n3, o3), (n4, o4), (n5, o5)])
