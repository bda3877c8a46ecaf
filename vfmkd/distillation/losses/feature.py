"""Feature distillation losses: adapted student map vs teacher map on the student's grid."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.registry import LOSSES
from vfmkd.distillation.adapters import ChannelAdapter


class FeatureDistillLoss(nn.Module, ABC):
    """Adapter + a per-location distance, averaged over valid locations.

    ``forward(student (B, C_s, H, W), teacher (B, C_t, H, W), mask (B, 1, H, W))`` returns
    ``(loss, cosine)``: the loss and the mean cosine similarity between adapted student and teacher
    vectors over valid locations (what users judge distillation by). Subclasses define
    :meth:`distance` as a (B, 1, H, W) map.
    """

    kind = "feature"

    def __init__(
        self,
        teacher: str,
        student_channels: int,
        teacher_channels: int,
        student_level: Optional[str] = None,
        teacher_feature: Optional[str] = None,
        adapter_hidden: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.student_level = student_level
        self.teacher_feature = teacher_feature
        self.adapter = ChannelAdapter(student_channels, teacher_channels, adapter_hidden)

    @abstractmethod
    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) x2 -> (B, 1, H, W) per-location distance."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        adapted = self.adapter(student).float()
        teacher = teacher.float()
        denom = mask.sum().clamp_min(1.0)
        loss = (self.distance(adapted, teacher) * mask).sum() / denom
        with torch.no_grad():
            cos = F.cosine_similarity(adapted, teacher, dim=1, eps=1e-6).unsqueeze(1)
            cosine = (cos * mask).sum() / denom
        return loss, cosine


@LOSSES.register("feature_mse")
class FeatureMSELoss(FeatureDistillLoss):
    """Mean squared error per channel, averaged over valid locations."""

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (student - teacher).pow(2).mean(dim=1, keepdim=True)
