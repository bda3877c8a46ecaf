"""Segmentation task losses: instance (ultralytics' v8SegmentationLoss), semantic (CE + Dice) and
binary (BCE + Dice). Each is called as ``loss(head_output, batch)`` with the training output of the
head its entry names and the :class:`~vfmkd.datasets.records.Batch`, and returns the scalar loss and
its detached, weighted parts (they sum to the loss)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.utils.loss import v8SegmentationLoss

from vfmkd.core.registry import LOSSES
from vfmkd.datasets.records import Batch
from vfmkd.distillation.losses.task import TaskLoss, graph_zero, labelled_images

LossOut = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


def _missing(batch: Batch, field: str, loss: str, flag: str) -> None:
    if getattr(batch, field, None) is None:
        raise ValueError(
            f"{loss}: the batch carries no {field} targets; build the dataset with {flag} (a segmentation head "
            f"needs mask labels)")


@LOSSES.register("instance_segmentation")
class InstanceSegmentationLoss(TaskLoss):
    """ultralytics' ``v8SegmentationLoss`` (box CIoU + mask BCE inside the box + cls BCE + DFL, each
    with its gain; the mask term uses the ``box`` gain as ultralytics does), per-instance masks
    (``overlap_mask=False``), averaged per image.

    Only images with instance labels (``batch.instances.labelled``) count: head outputs and targets
    are sliced to them, so an image without a polygon file neither teaches "no objects here" nor
    dilutes the average. With no labelled image the loss is 0 (still connected to the head's graph).
    Parts: ``box``, ``seg``, ``cls``, ``dfl``.
    """

    def __init__(self, head: nn.Module, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5) -> None:
        if not hasattr(head, "detect") or not hasattr(head.detect, "proto"):
            raise ValueError(f"instance_segmentation needs an instance head (yolo_seg_head), got {type(head).__name__}")
        # v8SegmentationLoss reads hyper-parameters from `model.args` and the Segment module from
        # `model.model[-1]`; a namespace gives it exactly that view of our head.
        args = SimpleNamespace(box=box, cls=cls, dfl=dfl, overlap_mask=False)
        self._loss = v8SegmentationLoss(SimpleNamespace(args=args, model=[head.detect], parameters=head.parameters))

    def __call__(self, head_output: Dict[str, Any], batch: Batch) -> LossOut:
        _missing(batch, "instances", "instance_segmentation", "instances=True")
        inst = batch.instances
        preds = head_output[1] if isinstance(head_output, tuple) else head_output
        device = preds["scores"].device
        labelled = inst.labelled.to(device).bool()
        names = ("box", "seg", "cls", "dfl")
        if not bool(labelled.any()):
            zero = graph_zero(preds["boxes"], preds["scores"], preds["mask_coefficient"], preds["proto"])
            return zero, {k: torch.zeros((), device=device) for k in names}
        sliced, rows, index = labelled_images(preds, labelled, inst.batch_idx.to(device))
        targets = {
            "cls": inst.cls.to(device)[rows].view(-1, 1),
            "bboxes": inst.bboxes.to(device)[rows].view(-1, 4),
            "batch_idx": index,
            "masks": inst.masks.to(device)[rows].float(),
        }
        total, items = self._loss(sliced, targets)  # total: (5,) x labelled images; sem_loss is unused
        value = total[:4].sum() / int(labelled.sum())
        return value, {k: items[f"{k}_loss"] for k in names}


def soft_dice(probs: torch.Tensor, target: torch.Tensor, smooth: float) -> torch.Tensor:
    """1 - (2 sum(p g) + smooth) / (sum p + sum g + smooth) per row of (K, P) probabilities and
    {0, 1} targets -> (K,)."""
    inter = (probs * target).sum(1)
    return 1 - (2 * inter + smooth) / (probs.sum(1) + target.sum(1) + smooth)


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@LOSSES.register("semantic_segmentation")
class SemanticSegmentationLoss(TaskLoss):
    """``ce`` x cross-entropy + ``dice`` x soft Dice on the logits (B, K, h, w) bilinearly upsampled
    to the target's S x S.

    Pixels of class 0 (unlabeled, letterbox padding, images without a semantic mask) are ignored by
    both terms. CE: mean over the remaining pixels. Dice: softmax probabilities; per class k >= 1
    present in the batch's labelled pixels, 1 - (2 sum p_k g_k + smooth) / (sum p_k + sum g_k + smooth)
    over the labelled pixels of the whole batch; averaged over those classes. A batch with no
    labelled pixel gives 0 (connected to the graph). Parts: ``ce``, ``dice`` (weighted).
    """

    def __init__(self, head: nn.Module, ce: float = 1.0, dice: float = 1.0, smooth: float = 1.0) -> None:
        self.num_classes = getattr(head, "num_classes", None)
        self.ce_weight, self.dice_weight, self.smooth = float(ce), float(dice), float(smooth)

    def __call__(self, head_output: torch.Tensor, batch: Batch) -> LossOut:
        _missing(batch, "semantic", "semantic_segmentation", "semantic=True")
        target = batch.semantic.to(head_output.device).long()  # (B, S, S)
        logits = _upsample(head_output, target.shape[-2:]).float()
        valid = target != 0
        if not bool(valid.any()):
            zero = graph_zero(head_output)
            return zero, {"ce": zero.detach(), "dice": zero.detach()}
        ce = F.cross_entropy(logits, target, ignore_index=0)
        k = logits.shape[1]
        probs = logits.softmax(1).permute(1, 0, 2, 3)[:, valid]  # (K, P) labelled pixels
        onehot = F.one_hot(target[valid], k).T.float()  # (K, P)
        present = onehot.sum(1) > 0
        present[0] = False
        dice = soft_dice(probs[present], onehot[present], self.smooth).mean()
        ce, dice = self.ce_weight * ce, self.dice_weight * dice
        return ce + dice, {"ce": ce.detach(), "dice": dice.detach()}


@LOSSES.register("binary_segmentation")
class BinarySegmentationLoss(TaskLoss):
    """``bce`` x binary cross-entropy + ``dice`` x soft Dice on the foreground logits (B, 1, h, w)
    bilinearly upsampled to the target's S x S.

    Target pixels equal to 255 (letterbox padding, images without labels) are ignored by both terms.
    BCE: mean over the remaining pixels. Dice: 1 - (2 sum p g + smooth) / (sum p + sum g + smooth)
    over the labelled pixels of the whole batch, p = sigmoid(logit). A batch with no labelled pixel
    gives 0 (connected to the graph). Parts: ``bce``, ``dice`` (weighted).
    """

    def __init__(self, head: nn.Module, bce: float = 1.0, dice: float = 1.0, smooth: float = 1.0) -> None:
        self.bce_weight, self.dice_weight, self.smooth = float(bce), float(dice), float(smooth)

    def __call__(self, head_output: torch.Tensor, batch: Batch) -> LossOut:
        _missing(batch, "binary", "binary_segmentation", "binary_classes=[...]")
        target = batch.binary.to(head_output.device)  # (B, S, S) uint8 {0, 1, 255}
        logits = _upsample(head_output, target.shape[-2:])[:, 0].float()  # (B, S, S)
        valid = target != 255
        if not bool(valid.any()):
            zero = graph_zero(head_output)
            return zero, {"bce": zero.detach(), "dice": zero.detach()}
        x, g = logits[valid], target[valid].float()
        bce = F.binary_cross_entropy_with_logits(x, g)
        dice = soft_dice(x.sigmoid().view(1, -1), g.view(1, -1), self.smooth)[0]
        bce, dice = self.bce_weight * bce, self.dice_weight * dice
        return bce + dice, {"bce": bce.detach(), "dice": dice.detach()}
