"""Learned channel adapters that project student features into a teacher's feature space."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class ChannelAdapter(nn.Module):
    """(B, C_student, H, W) -> (B, C_teacher, H, W).

    A 1x1 convolution by default (as MobileSAM/EdgeSAM-style feature distillation does); with
    ``hidden`` channels, a small 1x1 -> BN -> GELU -> 1x1 MLP for teachers far from the student.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: Optional[int] = None) -> None:
        super().__init__()
        if hidden:
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.GELU(),
                nn.Conv2d(hidden, out_channels, 1),
            )
        else:
            self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
