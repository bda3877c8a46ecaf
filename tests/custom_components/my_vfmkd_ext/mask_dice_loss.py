"""An example user output loss, in one file outside vfmkd (docs/adding_a_loss.md walks through it):
soft Dice between the student's and a mask teacher's (SAM family) mask for every box of the view.

Two registrations make it usable from YAML: the loss itself (LOSSES) and its pairing, i.e. which
teacher output meets which head output (the pairing registry, keyed by (loss, teacher kind, task)).
The term is built by the hook it inherits from OutputDistillLoss: ``head:`` defaults to the only head
whose task this loss pairs with the teacher, other teachers and heads are refused by name."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.datasets.records import Batch
from vfmkd.distillation.losses.kd import OutputDistillLoss
from vfmkd.distillation.pairing.mask_pairs import instance_mask_pair
from vfmkd.distillation.pairing.registry import MASKS, register_pairing
from vfmkd.distillation.targets import TeacherTargets


@LOSSES.register("mask_dice_distill")
class MaskDiceDistillLoss(OutputDistillLoss):
    """``forward(student (1, M, H, W), teacher (1, M, H, W), weight (1, M, H, W))`` -> scalar:
    ``1 - mean_m (2 sum(w p q) + smooth) / (sum(w p) + sum(w q) + smooth)`` with ``p = sigmoid(s / T)``,
    ``q = sigmoid(t / T)`` (the teacher detached), summed over each mask's cells."""

    log_name = "loss_mask_dice"

    def __init__(self, temperature: float = 1.0, smooth: float = 1.0, teacher: Optional[str] = None) -> None:
        super().__init__(temperature, teacher)
        if smooth <= 0:
            raise ConfigError(f"mask_dice_distill: smooth must be > 0, got {smooth}")
        self.smooth = float(smooth)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self._check(student, teacher)
        p = torch.sigmoid(student.float() / self.temperature)
        q = torch.sigmoid(teacher.detach().float() / self.temperature)
        w = weight.float()
        dims = (-2, -1)
        dice = (2 * (w * p * q).sum(dims) + self.smooth) / ((w * p).sum(dims) + (w * q).sum(dims) + self.smooth)
        return 1 - dice.mean()


@register_pairing("mask_dice_distill", MASKS, ["instance"])
def instance_masks_for_dice(pairing: Any, output: Any, batch: Batch, target: TeacherTargets
                            ) -> Optional[Tuple[tuple, dict]]:
    """A mask teacher's box-prompted masks vs the instance head's mask of the anchor matched to each
    box, on the prototype grid (vfmkd's own mask_distill pairing, reused)."""
    pair = instance_mask_pair(pairing.head, output, batch, target)
    return None if pair is None else (pair, {})
