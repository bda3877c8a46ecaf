"""BiFPN-style neck with learnable multi-scale fusion (EfficientDet's fast normalised fusion).

Every backbone level is projected by a 1x1 conv (+ BN) to ``channels``; a top-down then a
bottom-up pass fuses neighbouring levels. Each fusion node resizes its inputs to its own level
(nearest upsampling, 3x3/2 max pooling), combines them (:class:`vfmkd.models.fusion.WeightedFusion`:
``learnable`` fast normalised fusion, ``sum`` or ``avg``) and runs a conv block (SiLU, depthwise 3x3,
pointwise 1x1, BN, as in EfficientDet).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import NECKS
from vfmkd.models.fusion import EPS, FUSIONS, WeightedFusion, check_fusion  # noqa: F401  (EPS re-exported)


def _block(channels: int) -> nn.Sequential:
    """EfficientDet's node conv: activation, depthwise-separable 3x3, BN."""
    return nn.Sequential(
        nn.SiLU(inplace=False),
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
    )


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """To ``size``: nearest upsampling, or 3x3/2 max pooling per halving (EfficientDet); a last
    nearest resize only when the pooled size is still off (non-power-of-two level ratios)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    while x.shape[-2] >= 2 * size[0] - 1 and x.shape[-2] > size[0]:
        x = F.max_pool2d(x, 3, 2, 1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="nearest")
    return x


@NECKS.register("fusion_fpn")
class FusionFPN(nn.Module):
    """BiFPN-style top-down + bottom-up fusion of every level the backbone declares (two or more).

    ``forward({"P3": (B, C3, H/8, W/8), "P4": ..., "P5": ...})`` returns the same level names and
    strides, each with ``channels`` channels (``feature_specs()`` says so). ``fusion``:
    ``learnable`` (fast normalised fusion, see the module docstring), ``sum`` or ``avg``.
    Fusion nodes, named as in EfficientDet for levels P3-P5: ``P4_td`` (P4_in, P5_in), ``P3_out``
    (P3_in, P4_td), ``P4_out`` (P4_in, P4_td, P3_out), ``P5_out`` (P5_in, P4_out);
    :meth:`fusion_weights` gives each node's normalised weights in that input order.
    """

    def __init__(self, in_specs: Sequence[FeatureSpec], channels: int = 64, fusion: str = "learnable") -> None:
        super().__init__()
        check_fusion(fusion, "model.neck.fusion")
        if int(channels) <= 0:
            raise ConfigError(f"model.neck.channels must be > 0, got {channels}")
        specs = tuple(in_specs)
        if len(specs) < 2:
            raise ConfigError(f"fusion_fpn fuses two or more levels, the backbone gives {[s.name for s in specs]}")
        strides = [s.stride for s in specs]
        if any(b <= a for a, b in zip(strides, strides[1:])):
            raise ConfigError(f"fusion_fpn needs levels in increasing stride order, got {strides}")
        self.fusion, self.channels = fusion, int(channels)
        self._in = specs
        self._specs = tuple(FeatureSpec(s.name, self.channels, s.stride) for s in specs)
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s.channels, self.channels, 1, bias=False), nn.BatchNorm2d(self.channels))
            for s in specs)
        names = [s.name for s in specs]
        last = len(names) - 1
        # (node, its inputs) in evaluation order: top-down, then bottom-up
        self._nodes: List[Tuple[str, Tuple[str, ...]]] = []
        above = f"{names[last]}_in"
        for i in range(last - 1, -1, -1):
            node = f"{names[i]}_td" if i > 0 else f"{names[i]}_out"
            self._nodes.append((node, (f"{names[i]}_in", above)))
            above = node
        below = f"{names[0]}_out"
        for i in range(1, last + 1):
            ins = (f"{names[i]}_in", f"{names[i]}_td", below) if i < last else (f"{names[i]}_in", below)
            node = f"{names[i]}_out"
            self._nodes.append((node, ins))
            below = node
        self.fuse = nn.ModuleDict({node: WeightedFusion(len(ins), fusion) for node, ins in self._nodes})
        self.blocks = nn.ModuleDict({node: _block(self.channels) for node, _ in self._nodes})

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    def fusion_inputs(self) -> Dict[str, List[str]]:
        """Node name -> the names of its inputs, in the order of :meth:`fusion_weights`."""
        return {node: list(ins) for node, ins in self._nodes}

    @torch.no_grad()
    def fusion_weights(self) -> Dict[str, List[float]]:
        """Node name -> its normalised fusion weights (learnable: relu(p)/(ε+Σrelu(p)); sum: 1s; avg: 1/n)."""
        return {node: [round(float(w), 6) for w in self.fuse[node].weights()] for node, _ in self._nodes}

    def forward(self, feats: Dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        maps: Dict[str, torch.Tensor] = {
            f"{s.name}_in": lat(feats[s.name]) for s, lat in zip(self._in, self.lateral)}
        for node, ins in self._nodes:
            size = maps[ins[0]].shape[-2:]  # the first input is always the node's own level
            maps[node] = self.blocks[node](self.fuse[node]([_resize(maps[k], size) for k in ins]))
        return OrderedDict((s.name, maps[f"{s.name}_out"]) for s in self._in)
