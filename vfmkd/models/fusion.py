"""Learnable multi-scale fusion, shared by every place that merges feature maps (the ``fusion_fpn`` neck's
nodes, the semantic head's final merge, query heads): EfficientDet's fast normalised fusion. A fusion
holds one scalar pᵢ per input, initialised to 1.0, and computes

    wᵢ = relu(pᵢ),   O = Σᵢ wᵢ·Iᵢ / (ε + Σⱼ wⱼ),   ε = 1e-4

(Tan et al., EfficientDet, CVPR 2020, "fast normalized fusion"); ``sum`` adds the inputs and ``avg``
takes their mean (no fusion parameters). A module that holds fusions reports them to the training log
(:mod:`vfmkd.engine.training.fusion_log`) through ``fusion_weights()`` (node -> normalised weights) and
``fusion_inputs()`` (node -> input names, in the same order).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vfmkd.core.errors import ConfigError, did_you_mean

FUSIONS = ("learnable", "sum", "avg")
EPS = 1e-4


def check_fusion(mode: str, where: str) -> str:
    """``mode`` when it is one of :data:`FUSIONS`, else a ConfigError naming ``where`` and the valid ones."""
    if mode not in FUSIONS:
        raise ConfigError(f"{where}: unknown fusion {mode!r}; valid: {', '.join(FUSIONS)}."
                          + did_you_mean(mode, FUSIONS))
    return mode


class WeightedFusion(nn.Module):
    """Combines ``n`` same-shaped tensors (B, C, H, W): fast normalised fusion (``learnable``), sum or mean."""

    def __init__(self, n: int, mode: str, eps: float = EPS) -> None:
        super().__init__()
        self.n, self.mode, self.eps = n, check_fusion(mode, "fusion"), eps
        # pᵢ initialised equal; absent for sum/avg (no parameter that would never get a gradient)
        self.p = nn.Parameter(torch.ones(n)) if mode == "learnable" else None

    def weights(self) -> torch.Tensor:
        """The normalised weights (n,): relu(p) / (eps + Σ relu(p)), or all 1 (sum) / 1/n (avg)."""
        if self.p is not None:
            w = torch.relu(self.p)
            return w / (self.eps + w.sum())
        return torch.full((self.n,), 1.0 if self.mode == "sum" else 1.0 / self.n)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.p is None:
            out = inputs[0]
            for x in inputs[1:]:
                out = out + x
            return out / self.n if self.mode == "avg" else out
        w = self.weights()
        out = inputs[0] * w[0]
        for i in range(1, self.n):
            out = out + inputs[i] * w[i]
        return out
