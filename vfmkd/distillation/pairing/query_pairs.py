"""Output pairings of a query panoptic head (``rapsam_head``) with a mask teacher (SAM family): each
box-prompted teacher mask is matched to one query per image by Hungarian assignment (the query head's
own matching rule, :mod:`vfmkd.distillation.query_matching`, with the teacher's mask probabilities as
soft targets and the box's class mapped to the head's class index), then

* ``mask_distill``: the matched query's mask logits vs the teacher's, on the head's grid (the teacher
  mask confined to its box, :data:`BACKGROUND_LOGIT` outside), weight = the teacher's valid region;
* ``kl_divergence``: the matched query's class logits (C + 1, no-object last) vs the teacher's class
  distribution. SAM is class-agnostic: the class is the prompt box's label, SAM gives its confidence
  ``q`` (the mean probability of its mask's positive cells inside the box, clamped to [0.05, 0.95];
  0.05 when it finds no object), so the teacher puts ``q`` on the box's class, ``1 - q`` on no-object
  and the floor elsewhere; the loss is softmax KL x T^2 (temperature from the entry, 4.0 by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from vfmkd.datasets.records import Batch
from vfmkd.distillation.pairing.mask_grid import BACKGROUND_LOGIT, box_cells, prompts_on_grid
from vfmkd.distillation.pairing.mask_pairs import class_channels, semantic_channels
from vfmkd.distillation.pairing.registry import MASKS, register_pairing
from vfmkd.distillation.query_matching import hungarian_match
from vfmkd.distillation.targets import TeacherTargets

TASKS_SERVED = ["panoptic_query"]
#: the range of SAM's confidence in its mask (no query is taught certainty SAM cannot give)
CONFIDENCE = (0.05, 0.95)


@dataclass
class QueryTeacherPairs:
    """The M matched (query, teacher mask) pairs of a batch: ``student_masks`` / ``teacher_masks`` /
    ``weight`` (M, h, w) on the head's grid; ``student_classes`` / ``teacher_classes`` (M, C + 1) logits."""

    student_masks: torch.Tensor
    teacher_masks: torch.Tensor
    weight: torch.Tensor
    student_classes: torch.Tensor
    teacher_classes: torch.Tensor


def teacher_class_logits(classes: torch.Tensor, masks: torch.Tensor, inside: torch.Tensor,
                         num_logits: int) -> torch.Tensor:
    """(M, C + 1) teacher class logits: log q on each mask's class, log(1 - q) on no-object, the floor
    elsewhere (q: the module docstring). ``masks`` (M, h, w) logits, ``inside`` (M, h, w) its box's cells."""
    probs = masks.sigmoid()
    positive = (masks > 0) & inside
    q = (probs * positive).sum((1, 2)) / positive.sum((1, 2)).clamp(min=1)
    q = torch.where(positive.any(2).any(1), q, torch.full_like(q, CONFIDENCE[0])).clamp(*CONFIDENCE)
    out = torch.full((len(classes), num_logits), BACKGROUND_LOGIT, device=masks.device)
    rows = torch.arange(len(classes), device=masks.device)
    out[rows, classes] = q.log()
    out[:, -1] = (1 - q).log()
    return out


def query_teacher_pairs(p: Any, output: Any, batch: Batch, target: TeacherTargets) -> Optional[QueryTeacherPairs]:
    """The teacher's box masks matched to the head's queries (module docstring); None when nothing pairs."""
    rec = p.read(output)
    grid_hw = tuple(rec.mask_logits.shape[-2:])
    stride = batch.images.shape[-1] // grid_hw[1]
    device = rec.mask_logits.device
    prompts = prompts_on_grid(batch, target, grid_hw, stride, device)
    if prompts is None:
        return None
    channel = class_channels(prompts.cls, p.channel_of_class)
    parts: List[Tuple[torch.Tensor, ...]] = []
    for b in torch.unique(prompts.batch_idx[channel >= 0]).tolist():
        rows = ((prompts.batch_idx == b) & (channel >= 0)).nonzero().view(-1)
        inside = box_cells(prompts.boxes[rows], grid_hw, stride)
        teacher = torch.where(inside, prompts.logits[rows], torch.full_like(prompts.logits[rows], BACKGROUND_LOGIT))
        q, t = hungarian_match(rec.class_logits[b], rec.mask_logits[b].flatten(1).float(), channel[rows],
                               teacher.sigmoid().flatten(1))
        parts.append((rec.mask_logits[b, q], teacher[t], prompts.valid[rows][t], rec.class_logits[b, q],
                      teacher_class_logits(channel[rows][t], teacher[t], inside[t], rec.class_logits.shape[-1])))
    if not parts:
        return None
    return QueryTeacherPairs(*(torch.cat(group) for group in zip(*parts)))


@register_pairing("mask_distill", MASKS, TASKS_SERVED, channels=semantic_channels)
def query_masks(p: Any, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
    pairs = query_teacher_pairs(p, output, batch, target)
    if pairs is None:
        return None
    return (pairs.student_masks[None], pairs.teacher_masks[None], pairs.weight[None]), {}


@register_pairing("kl_divergence", MASKS, TASKS_SERVED, channels=semantic_channels)
def query_classes(p: Any, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
    pairs = query_teacher_pairs(p, output, batch, target)
    return None if pairs is None else ((pairs.student_classes, pairs.teacher_classes), {})
