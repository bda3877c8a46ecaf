"""The summary loss of the agglomerative recipe (AM-RADIO, UNIC): a teacher's global token (DINO's CLS
token, RADIO's summary token: the teacher's 1x1 ``summary_feature``, cached like any other map) against
the student's level pooled over the image, through a small MLP head."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.losses.feature import FeatureDistillLoss
from vfmkd.distillation.terms import FEATURE_LOG_PREFIX, LossEntry, LossTerm, TermContext


@LOSSES.register("summary_distill")
class SummaryDistillLoss(FeatureDistillLoss):
    """``cosine_weight x (1 - cos) + smooth_l1_weight x smooth L1`` between the teacher's summary token
    (B, C_t, 1, 1) and the student level pooled over the image's valid cells (the distiller pools a 1x1
    teacher map's student level: (B, C_s, 1, 1)), projected by an MLP (1x1 conv -> GELU -> 1x1 conv, hidden
    ``adapter_hidden``, default C_t; no BatchNorm, so a batch of one trains too).

    ``teacher_feature`` defaults to the teacher's coarsest map (its summary token: stride = its input size);
    a spatial map is refused. Logged as ``loss_feat_distill_<teacher>_summary`` (cosine: ``cos_<teacher>_summary``).
    """

    def __init__(
        self,
        teacher: str,
        student_channels: int,
        teacher_channels: int,
        student_level: Optional[str] = None,
        teacher_feature: Optional[str] = None,
        adapter_hidden: Optional[int] = None,
        cosine_weight: float = 1.0,
        smooth_l1_weight: float = 1.0,
        beta: float = 1.0,
    ) -> None:
        super().__init__(teacher, student_channels, teacher_channels, student_level, teacher_feature)
        if cosine_weight < 0 or smooth_l1_weight < 0 or cosine_weight + smooth_l1_weight == 0:
            raise ConfigError(f"summary_distill: cosine_weight and smooth_l1_weight must be >= 0 and not both 0, got "
                              f"{cosine_weight} and {smooth_l1_weight}")
        if beta < 0:
            raise ConfigError(f"summary_distill: beta must be >= 0 (0 means L1), got {beta}")
        hidden = int(adapter_hidden or teacher_channels)
        self.adapter = nn.Sequential(nn.Conv2d(student_channels, hidden, 1), nn.GELU(),
                                     nn.Conv2d(hidden, teacher_channels, 1))
        self.cosine_weight, self.smooth_l1_weight = float(cosine_weight), float(smooth_l1_weight)
        self.beta = float(beta)

    @classmethod
    def build_term(cls, entry: LossEntry, context: TermContext) -> LossTerm:
        teacher = entry.kwargs.get("teacher")
        if not entry.kwargs.get("teacher_feature") and teacher in context.teacher_specs:
            entry.kwargs["teacher_feature"] = max(context.teacher_specs[teacher], key=lambda s: s.stride).name
        term = super().build_term(entry, context)
        if not entry.log_as:
            term.log_name = f"{FEATURE_LOG_PREFIX}{teacher}_summary"
        return term

    def compare(self, adapted: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if tuple(teacher.shape[-2:]) != (1, 1):
            raise ConfigError(
                f"summary_distill (teacher '{self.teacher}'): '{self.teacher_feature}' is a "
                f"{teacher.shape[-2]}x{teacher.shape[-1]} map, not a summary token; set teacher_feature to the "
                "teacher's 1x1 summary map (cls_token, summary) or use a feature loss for spatial maps")
        a, t = adapted.flatten(1), teacher.flatten(1)
        cosine = 1.0 - F.cosine_similarity(a, t, dim=1, eps=1e-6).mean()
        return self.cosine_weight * cosine + self.smooth_l1_weight * F.smooth_l1_loss(a, t, beta=self.beta)
