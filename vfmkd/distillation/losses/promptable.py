"""Losses of the promptable (SAM-decoder) student, EdgeSAM's recipe: encoder distillation on SAM's
image embeddings, then decoder distillation on SAM's mask logits for the same prompts.

Both are output-kind entries that name ``teacher:`` and ``head:`` (the ``sam_decoder`` head); which
tensors meet is decided by :mod:`vfmkd.distillation.pairing.prompt_pairs` (the distiller runs the pairing
and calls the loss with its result). Teacher tensors are targets: detached, never trained.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.pairing.prompt_pairs import build_embedding_term, build_prompt_term
from vfmkd.distillation.terms import LossEntry, LossTerm, TermContext


@LOSSES.register("embedding_distill")
class EmbeddingDistillLoss(nn.Module):
    """Encoder distillation (EdgeSAM phase 1): pixel-wise MSE between the head's image embeddings
    and the teacher's embedding map resampled onto the same grid by the feature geometry.

    ``forward(student (B, C, h, w), teacher (B, C, h, w), mask (B, 1, h, w))`` ->
    ``sum(mask * mean_c (s - t)^2) / sum(mask)``: cells whose centre lies in the teacher's padding
    (or outside its view) have mask 0 and do not count.

    No standardisation: the teacher map is used raw even when ``distillation.standardize`` is on
    (that applies to feature terms, whose adapter absorbs it), because SAM's mask decoder reads the
    embeddings at their own scale. No channel adapter either: the head's neck is the adapter.
    ``teacher_feature``: the teacher map (default: its primary one if it is 256-wide at stride 16,
    SAM's ``image_embeddings``, SAM2's ``fpn_s16``).
    """

    kind = "output"
    log_name = "loss_embed_distill"

    def __init__(self, teacher: Optional[str] = None, teacher_feature: Optional[str] = None) -> None:
        super().__init__()
        self.teacher, self.teacher_feature = teacher, teacher_feature

    @classmethod
    def build_term(cls, entry: LossEntry, context: TermContext) -> LossTerm:
        """The promptable head's embeddings vs the teacher's map
        (:func:`~vfmkd.distillation.pairing.prompt_pairs.build_embedding_term`)."""
        return build_embedding_term(entry, context)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"embedding_distill: student embeddings {tuple(student.shape)} and teacher map "
                             f"{tuple(teacher.shape)} differ")
        per_cell = (student.float() - teacher.detach().float()).pow(2).mean(dim=1, keepdim=True)
        w = mask.float().expand_as(per_cell)
        return (per_cell * w).sum() / w.sum().clamp_min(1e-6)


def weighted_bce_dice(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, smooth: float = 1.0,
                      binarize: bool = False):
    """(BCE, Dice) of student logits (M, H, W) against the teacher's logits as targets, weighted
    per cell. Target ``t = sigmoid(teacher)`` (``binarize``: ``teacher > 0``). BCE: ``sum(w * bce) /
    sum(w)``; Dice per mask ``1 - (2 sum(w p t) + smooth) / (sum(w p) + sum(w t) + smooth)``,
    ``p = sigmoid(student)``, averaged over the masks."""
    s = student.float()
    t = (teacher.detach().float() > 0).float() if binarize else teacher.detach().float().sigmoid()
    w = weight.float()
    bce = (F.binary_cross_entropy_with_logits(s, t, reduction="none") * w).sum() / w.sum().clamp_min(1e-6)
    p = s.sigmoid()
    dims = tuple(range(1, s.ndim))
    inter = (w * p * t).sum(dims)
    dice = 1 - (2 * inter + smooth) / ((w * p).sum(dims) + (w * t).sum(dims) + smooth)
    return bce, dice.mean()


@LOSSES.register("prompt_distill")
class PromptDistillLoss(nn.Module):
    """Decoder distillation (EdgeSAM phase 2): the student's low-res mask logits for a prompt vs the
    teacher's mask logits for the same prompt: ``bce`` x BCE + ``dice`` x Dice
    (:func:`weighted_bce_dice`, soft targets ``sigmoid(teacher)`` unless ``binarize``), weighted by
    the cells in the teacher's valid (unpadded) region.

    ``forward(student (M, H, W), teacher (M, H, W), weight (M, H, W))`` -> scalar. The prompts
    (:class:`~vfmkd.distillation.pairing.prompt_pairs.PromptPairing`): every ground-truth box with a
    teacher mask; ``points`` foreground points per box sampled inside the ground-truth instance mask
    (when the batch has instance labels) or the teacher's mask, the box's teacher mask as target;
    ``refine_iters`` refinement rounds per prompt set, each adding one point from the error region
    (label 1 where the target is foreground) with the previous logits as ``mask_input``. ``seed``
    seeds the point sampling.
    """

    kind = "output"
    log_name = "loss_prompt_distill"

    def __init__(self, teacher: Optional[str] = None, bce: float = 5.0, dice: float = 5.0, points: int = 1,
                 refine_iters: int = 1, smooth: float = 1.0, binarize: bool = False, seed: int = 0) -> None:
        super().__init__()
        if bce < 0 or dice < 0 or bce + dice <= 0:
            raise ConfigError(f"prompt_distill: bce and dice must be >= 0 and not both 0, got {bce}, {dice}")
        if points < 0 or refine_iters < 0:
            raise ConfigError(f"prompt_distill: points and refine_iters must be >= 0, got {points}, {refine_iters}")
        self.teacher = teacher
        self.bce_weight, self.dice_weight, self.smooth, self.binarize = (
            float(bce),
            float(dice),
            float(smooth),
            bool(binarize),
        )
        self.points, self.refine_iters, self.seed = int(points), int(refine_iters), int(seed)

    @classmethod
    def build_term(cls, entry: LossEntry, context: TermContext) -> LossTerm:
        """Prompts through the promptable head vs the teacher's masks
        (:func:`~vfmkd.distillation.pairing.prompt_pairs.build_prompt_term`)."""
        return build_prompt_term(entry, context)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"prompt_distill: student masks {tuple(student.shape)} and teacher masks "
                             f"{tuple(teacher.shape)} differ")
        bce, dice = weighted_bce_dice(student, teacher, weight, self.smooth, self.binarize)
        return self.bce_weight * bce + self.dice_weight * dice
