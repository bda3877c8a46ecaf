"""The task loss of a query panoptic head (``rapsam_head``): Hungarian-matched set prediction on the
batch's panoptic segments, Mask2Former's recipe plus RapSAM's IoU term.

Targets per image (images with both instance and semantic labels; the others are left out): every
instance mask (``batch.instances``, S/4; its detection class mapped by name to its semantic index:
the thing classes) and, per stuff class present in the semantic map (a semantic index no detection
class maps to), the mask of its pixels. Masks meet at ``num_points`` random points per image
(:mod:`vfmkd.distillation.query_matching`); queries are matched to targets by Hungarian assignment
(cost ``cls`` / ``mask`` / ``dice``), then:

* ``loss_cls``: cross-entropy of every query's class logits, matched queries to their target's class,
  the others to "no object" (weighted ``no_object``);
* ``loss_mask``: point-wise BCE of the matched masks; ``loss_dice``: their soft Dice;
* ``loss_iou``: MSE between a matched query's predicted IoU and the IoU of its mask (logit > 0) with
  its target at the points (RapSAM/SAM's IoU head);

mask, Dice and IoU terms are averaged over the matched targets of the batch. Each is logged under its
own name (the loss reads the whole student output, as DSRL's term does, so its parts are not prefixed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.datasets.records import Batch
from vfmkd.distillation.losses.task import TaskLoss
from vfmkd.distillation.query_matching import MatchCosts, hungarian_match, point_sample, random_points
from vfmkd.distillation.terms import LossEntry, LossTerm, TermContext
from vfmkd.tasks import QueryPanopticOutput, task_of

TASK = "panoptic_query"
PARTS = ("loss_cls", "loss_mask", "loss_dice", "loss_iou")


@dataclass
class PointTargets:
    """One image's targets at its sample points: ``classes`` (T,) class index, ``points`` (T, P) in [0, 1]."""

    classes: torch.Tensor
    points: torch.Tensor


def is_query_head(head: Any) -> bool:
    """The head's task reads its output as query panoptic output (a ``rapsam_head``)."""
    return issubclass(task_of(head).output_type, QueryPanopticOutput)


def query_head_name(where: str, context: TermContext, head: Optional[str]) -> str:
    """``head:``, else the model's only query panoptic head."""
    if head is not None:
        return head
    found = [n for n, h in context.model.heads.items() if is_query_head(h)]
    if len(found) != 1:
        raise ConfigError(f"{where}: set 'head:' to the {TASK} head this loss trains (candidates: {found or 'none'})")
    return found[0]


@LOSSES.register("query_panoptic")
class QueryPanopticLoss(TaskLoss):
    """``loss(out: StudentOutput, batch)`` -> (cls x loss_cls + mask x loss_mask + dice x loss_dice + iou x
    loss_iou, {part: weighted value}) for the head ``head_name`` (module docstring).

    ``class_of_detection`` (C_det,): detection class id -> the head's class index (its semantic index;
    -1: none); its values are the thing classes, every other index >= 1 is stuff. ``num_points``: sample
    points per image; ``no_object``: the class weight of "no object" (Mask2Former's 0.1); ``weight_high`` /
    ``weight_low``: the two paths' weights in a dual-path resolution step (this loss reads the whole student
    output, so it weighs its paths itself, like ``model.resolution_distill.task_weight_high/low`` elsewhere)."""

    reads_student_output = True

    def __init__(self, head: nn.Module, class_of_detection: Sequence[int], head_name: str = "panoptic",
                 cls: float = 2.0, mask: float = 5.0, dice: float = 5.0, iou: float = 1.0, no_object: float = 0.1,
                 num_points: int = 1024, weight_high: float = 1.0, weight_low: float = 1.0) -> None:
        if not is_query_head(head):
            raise ValueError(f"query_panoptic trains a {TASK} head (rapsam_head), got {type(head).__name__}")
        if num_points < 1 or min(cls, mask, dice, iou, no_object) < 0:
            raise ValueError(f"num_points must be >= 1 and the weights >= 0, got num_points={num_points}")
        self.head_name, self.num_classes = head_name, int(head.num_classes)
        table = torch.as_tensor(list(class_of_detection), dtype=torch.long)
        self.class_of_detection = torch.where(table < self.num_classes, table, torch.full_like(table, -1))
        self.is_thing = torch.zeros(self.num_classes, dtype=torch.bool)
        self.is_thing[self.class_of_detection[self.class_of_detection >= 0]] = True
        if not bool(self.is_thing.any()):
            raise ValueError("no detection class maps to a class of the head: the things have no class (check the "
                             "object_detection and semantic_segmentation class names)")
        self.weights = {"loss_cls": float(cls), "loss_mask": float(mask), "loss_dice": float(dice),
                        "loss_iou": float(iou)}
        self.costs = MatchCosts(cls, mask, dice)
        self.no_object, self.num_points = float(no_object), int(num_points)
        self.weight_high, self.weight_low = float(weight_high), float(weight_low)

    @classmethod
    def build_term(cls, entry: LossEntry, context: TermContext) -> LossTerm:
        """The head (``head:``, else the only query panoptic head) and the dataset's detection class ->
        semantic index table (the thing classes; every other semantic class is stuff, its masks the
        semantic labels')."""
        head = query_head_name(entry.where, context, entry.kwargs.pop("head", None))
        module = context.model_head(entry.where, head)
        table = context.class_channels.get(task_of(module).name)
        if table is None:
            raise ConfigError(
                f"{entry.where}: the {TASK} head '{head}' predicts stuff classes, and stuff has no masks in these "
                "labels: the dataset needs its semantic masks and class table (semantic_segmentation/config.yaml) "
                "and its object_detection/config.yaml (which semantic classes are things)")
        loss = LOSSES.build(entry.type, where=entry.where, head=module, head_name=head, class_of_detection=table,
                            **entry.kwargs)
        return entry.term(cls.kind, loss, f"loss_{head}", head)

    def image_targets(self, batch: Batch, i: int, points: torch.Tensor) -> PointTargets:
        """Image ``i``'s things (instance masks) and stuff (semantic pixels of each stuff class) at ``points``."""
        inst, semantic = batch.instances, batch.semantic[i]
        rows = (inst.batch_idx.view(-1).long() == i).nonzero().view(-1).to(inst.masks.device)
        classes = self.class_of_detection.to(rows.device)[inst.cls.view(-1).long()[rows]]
        rows, classes = rows[classes >= 0], classes[classes >= 0]
        things = point_sample(inst.masks[rows].float(), points.to(inst.masks.device)) if len(rows) else \
            torch.zeros(0, len(points), device=points.device)
        size = torch.tensor(semantic.shape[::-1], device=points.device)  # (W, H)
        cells = (points * size).long().minimum(size - 1)
        labels = semantic.to(points.device)[cells[:, 1], cells[:, 0]].long()  # (P,) class at each point
        present = torch.unique(semantic).to(points.device).long()
        stuff = present[(present > 0) & (present < self.num_classes)]
        stuff = stuff[~self.is_thing.to(stuff.device)[stuff]]
        return PointTargets(torch.cat([classes.to(points.device), stuff]),
                            torch.cat([things.to(points.device), (labels[None] == stuff[:, None]).float()]))

    def __call__(self, out: Any, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss on ``out.heads[head_name]``; in a dual-path resolution step (``out.low`` holds the head)
        ``weight_high`` x that + ``weight_low`` x the low path's, logged as ``loss_<head>_high`` / ``_low``
        (the parts are the high path's)."""
        value, parts = self.path_loss(out.heads[self.head_name], batch)
        low = getattr(out, "low", None)
        if low is None or self.head_name not in low.heads:
            return value, parts
        low_value, _ = self.path_loss(low.heads[self.head_name], batch)
        parts.update({f"loss_{self.head_name}_high": value.detach(), f"loss_{self.head_name}_low": low_value.detach()})
        return self.weight_high * value + self.weight_low * low_value, parts

    def path_loss(self, raw: Any, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of one head output (the module docstring) and its weighted parts."""
        rec = QueryPanopticOutput.read(raw)
        if batch.instances is None or batch.semantic is None:
            raise ValueError("query_panoptic: the batch carries no instance or semantic targets; build the dataset "
                             "with instances=True and semantic=True (the things' and the stuff's masks)")
        device = rec.class_logits.device
        labelled = batch.instances.labelled.bool().cpu() & (batch.semantic.flatten(1) > 0).any(1).cpu()
        images = labelled.nonzero().view(-1).tolist()
        if not images:
            zero = sum((t.float() * 0).sum() for t in rec.raw)  # 0 on the head's graph (DDP sees every parameter)
            return zero, {k: zero.detach() for k in PARTS}
        no_object = rec.class_logits.shape[-1] - 1
        target_classes = torch.full(rec.class_logits.shape[:2], no_object, dtype=torch.long, device=device)
        preds, targets, ious = [], [], []
        for i in images:
            points = random_points(self.num_points, device)
            found = self.image_targets(batch, i, points)
            pred = point_sample(rec.mask_logits[i].float(), points)  # (Q, P)
            q, t = hungarian_match(rec.class_logits[i], pred, found.classes, found.points, self.costs)
            target_classes[i, q] = found.classes[t]
            preds.append(pred[q])
            targets.append(found.points[t])
            ious.append(rec.iou[i, q])
        weight = torch.ones(no_object + 1, device=device)
        weight[no_object] = self.no_object
        used = torch.tensor(images, device=device)
        loss_cls = F.cross_entropy(rec.class_logits[used].flatten(0, 1).float(), target_classes[used].flatten(),
                                   weight)
        pred, target, iou = torch.cat(preds), torch.cat(targets), torch.cat(ious).float()
        count = max(len(pred), 1)
        loss_mask = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(1).sum() / count
        probs = pred.sigmoid()
        loss_dice = (1 - (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)).sum() / count
        with torch.no_grad():
            hit, truth = pred > 0, target > 0.5
            actual = (hit & truth).sum(1).float() / (hit | truth).sum(1).clamp(min=1).float()
        loss_iou = F.mse_loss(iou, actual, reduction="sum") / count
        raw = {"loss_cls": loss_cls, "loss_mask": loss_mask, "loss_dice": loss_dice, "loss_iou": loss_iou}
        parts = {k: self.weights[k] * v for k, v in raw.items()}
        total = sum(parts.values())
        return total, {k: v.detach() for k, v in parts.items()}
