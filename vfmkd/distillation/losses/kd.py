"""Output (logit) distillation: the student's predictions vs the teacher's, softened by a temperature.

All losses here have ``kind = "output"`` and return one scalar tensor. The teacher logits are a
target: they are detached, so no gradient reaches a teacher even if it is not frozen. Every loss is
multiplied by ``T**2`` (Hinton et al. 2015): the gradient of a softened KL shrinks like ``1/T**2``,
and the factor keeps its size comparable across temperatures and with the task loss.

The losses take plain tensors; which student logits meet which teacher logits (instance masks per
ground-truth box, class unions for semantic/binary heads, anchors for class scores) is the pairing
registered for (loss, teacher kind, head task) in :mod:`vfmkd.distillation.pairing.registry`, which
the distiller runs before calling them. :meth:`OutputDistillLoss.build_term` resolves an entry's
head and pairing; a subclass inherits it and may word its refusals (``pairing_refusal``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.errors import ConfigError, did_you_mean
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.pairing.output_pairs import build_output_term
from vfmkd.distillation.terms import LossEntry, LossTerm, TermContext

MODES = ("sigmoid", "softmax")


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` along ``dim`` (that dim is summed away)."""
    log_s = F.log_softmax(student / temperature, dim=dim)
    log_t = F.log_softmax(teacher / temperature, dim=dim)
    # Written with log-probabilities on both sides: exact where the teacher puts ~0 mass.
    return (log_t.exp() * (log_t - log_s)).sum(dim=dim)


def binary_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Element-wise ``KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T)))``, same shape as the inputs."""
    s, t = student / temperature, teacher / temperature
    p_t = torch.sigmoid(t)
    # logsigmoid(x) = log p, logsigmoid(-x) = log(1 - p): finite even for logits of +-100.
    return p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))


def masked_mean(values: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values``, or ``sum(w * v) / sum(w)`` with ``weight`` broadcast to its shape."""
    if weight is None:
        return values.mean()
    w = weight.to(values.dtype).expand_as(values)
    return (values * w).sum() / w.sum().clamp_min(1e-6)


class OutputDistillLoss(nn.Module):
    """Shared constructor: temperature and the (optional) teacher whose outputs this loss reads.

    ``teacher`` is routing/logging metadata for the distiller; the loss itself never reads it.
    """

    kind = "output"
    log_name = "loss_output_distill"

    def __init__(self, temperature: float = 1.0, teacher: Optional[str] = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"{type(self).__name__}: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.teacher = teacher

    @classmethod
    def build_term(cls, entry: LossEntry, context: TermContext) -> LossTerm:
        """The term of an output loss entry: its head and the pairing registered for (this loss,
        the teacher's kind, the head's task) (:func:`~vfmkd.distillation.pairing.output_pairs.build_output_term`)."""
        return build_output_term(entry, context)

    @classmethod
    def pairing_refusal(cls, where: str, head: str, task: Any, num_classes: int, teacher: Any,
                        heads_only: bool) -> Optional[str]:
        """Why no pairing of this loss serves head ``head`` (of ``task``, a :class:`~vfmkd.tasks.Task`)
        with ``teacher`` (``TeacherOutputs``), in this loss's words; None for the generic refusal.
        ``heads_only``: only a vfmkd teacher's heads can teach this task for this loss."""
        return None

    @staticmethod
    def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
        if student.shape != teacher.shape:
            raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")


@LOSSES.register("kl_divergence")
class KLDivergenceLoss(OutputDistillLoss):
    """Hinton KD on class logits.

    ``forward(student_logits (N, K), teacher_logits (N, K), weight (N,) = None)`` -> scalar::

        loss = T^2 * sum_n w_n KL(softmax(t_n/T) || softmax(s_n/T)) / sum_n w_n

    Without ``weight`` that is torch's ``batchmean`` (sum over classes, mean over rows).
    """

    log_name = "loss_kl_distill"

    def __init__(self, temperature: float = 4.0, teacher: Optional[str] = None) -> None:
        super().__init__(temperature, teacher)

    @classmethod
    def pairing_refusal(cls, where: str, head: str, task: Any, num_classes: int, teacher: Any,
                        heads_only: bool) -> Optional[str]:
        if not teacher.can_segment:
            return None
        return (f"{where}: kl_divergence on the {task.name} head '{head}' needs the teacher's "
                f"{'per-pixel class' if task.dense_logits else 'class'} distribution: a vfmkd teacher with a "
                f"{task.name} head of the same classes. Teacher '{teacher.name}' ({teacher.type}) gives class-agnostic "
                f"box masks: use mask_distill (all mask-capable heads) or kl_divergence on a binary head")

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(student_logits, teacher_logits)
        kl = softmax_kl(student_logits.float(), teacher_logits.detach().float(), self.temperature, dim=-1)
        return masked_mean(kl, weight) * self.temperature ** 2


@LOSSES.register("cls_distill")
class ClsDistillLoss(OutputDistillLoss):
    """Per-anchor class-score distillation for a detector (YOLOv8: independent sigmoids per class).

    ``forward(student_logits, teacher_logits, mask=None, class_dim=1)`` -> scalar. Logits are
    (B, K, A) as ultralytics' raw ``scores`` (the default ``class_dim=1``), or (N, K); ``mask``
    has the logits' shape without the class dim ((B, A) or (N,)), bool or float weights.

    - ``mode="sigmoid"``: per anchor ``sum_k KL(Bern(sigmoid(t_k/T)) || Bern(sigmoid(s_k/T)))``.
    - ``mode="softmax"``: per anchor ``KL(softmax(t/T) || softmax(s/T))`` over the K classes.

    ``loss = T^2 * mean over (masked) anchors of the per-anchor value``. The default ``T = 1``:
    sigmoid scores are already calibrated per class, and a high T pushes every class toward 0.5.
    """

    log_name = "loss_cls_distill"

    def __init__(self, temperature: float = 1.0, mode: str = "sigmoid", teacher: Optional[str] = None) -> None:
        super().__init__(temperature, teacher)
        if mode not in MODES:
            raise ConfigError(f"cls_distill: mode must be one of {MODES}, got '{mode}'.{did_you_mean(mode, MODES)}")
        self.mode = mode

    @classmethod
    def pairing_refusal(cls, where: str, head: str, task: Any, num_classes: int, teacher: Any,
                        heads_only: bool) -> Optional[str]:
        if not (teacher.can_segment or heads_only):
            return None
        return (f"{where}: cls_distill on the {task.name} head '{head}' needs a teacher that provides class scores: "
                f"a vfmkd teacher (type: vfmkd, a trained vfmkd checkpoint) with a {task.name} head of the same "
                f"{num_classes} classes; teacher '{teacher.name}' ({teacher.type}) provides none"
                + (" (box-prompted masks are class-agnostic; its image-level class scores serve semantic and binary "
                   "heads only)" if teacher.can_segment else ""))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        class_dim: int = 1,
    ) -> torch.Tensor:
        self._check(student_logits, teacher_logits)
        s, t = student_logits.float(), teacher_logits.detach().float()
        if self.mode == "sigmoid":
            per_anchor = binary_kl(s, t, self.temperature).sum(dim=class_dim)
        else:
            per_anchor = softmax_kl(s, t, self.temperature, dim=class_dim)
        return masked_mean(per_anchor, mask) * self.temperature ** 2


@LOSSES.register("mask_distill")
class MaskDistillLoss(OutputDistillLoss):
    """Per-pixel distillation of mask logits (e.g. SAM's low-res masks for box prompts).

    ``forward(student_logits (B, M, H, W), teacher_logits (B, M, H, W), mask=None)`` -> scalar;
    the caller resizes both to one size. ``mask`` broadcasts to (B, M, H, W): (B, 1, H, W) for
    valid pixels, (B, M, 1, 1) for padded prompt slots, or (B, M, H, W)::

        loss = T^2 * sum_p m_p KL(Bern(sigmoid(t_p/T)) || Bern(sigmoid(s_p/T))) / sum_p m_p
    """

    log_name = "loss_mask_distill"

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(student_logits, teacher_logits)
        kl = binary_kl(student_logits.float(), teacher_logits.detach().float(), self.temperature)
        return masked_mean(kl, mask) * self.temperature ** 2
