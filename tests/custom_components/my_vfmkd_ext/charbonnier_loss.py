"""An example user loss: Charbonnier (a smooth, robust L1) feature distillation, registered from
outside the vfmkd package (docs/adding_a_loss.md walks through it)."""
from __future__ import annotations

from typing import Optional

import torch

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.losses.feature import PerLocationLoss


@LOSSES.register("feature_charbonnier")
class FeatureCharbonnierLoss(PerLocationLoss):
    """``sqrt(d**2 + eps**2) - eps`` per element (d = adapted student - teacher), mean over channels,
    averaged over valid locations: ~L2 for |d| << eps, ~L1 beyond, so a few outlier channels of the
    teacher do not dominate. Shapes as :class:`FeatureDistillLoss`."""

    # The base signature is repeated (not **kwargs): the registry checks YAML keys against it.
    def __init__(
        self,
        teacher: str,
        student_channels: int,
        teacher_channels: int,
        student_level: Optional[str] = None,
        teacher_feature: Optional[str] = None,
        adapter_hidden: Optional[int] = None,
        eps: float = 1e-3,
    ) -> None:
        super().__init__(teacher, student_channels, teacher_channels, student_level, teacher_feature, adapter_hidden)
        if eps <= 0:
            raise ConfigError(f"feature_charbonnier: eps must be > 0, got {eps}")
        self.eps = float(eps)

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        d = student - teacher
        return (torch.sqrt(d * d + self.eps ** 2) - self.eps).mean(dim=1, keepdim=True)
