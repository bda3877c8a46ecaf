"""The task loss of an ultralytics student head: the model's own criterion (vfmkd/models/ultralytics_student.py)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

import torch
from ultralytics.cfg import DEFAULT_CFG_DICT
from ultralytics.utils import IterableSimpleNamespace

from vfmkd.core.registry import LOSSES
from vfmkd.datasets.records import Batch
from vfmkd.distillation.losses.task import TaskLoss, graph_zero, labelled_images
from vfmkd.distillation.prefetch import tensors_in


@LOSSES.register("ultralytics")
class UltralyticsTaskLoss(TaskLoss):
    """What ultralytics trains the head's model with: ``model_class.init_criterion`` on a view of the head
    (``v8DetectionLoss`` for YOLOv8/11 Detect, ``E2ELoss`` over both branches for YOLO26's end-to-end head,
    ``v8SegmentationLoss`` / ``SegmentLoss26`` for Segment heads), averaged per labelled image: the criterion
    runs on the batch's labelled images alone (``Batch.labelled``; a segment head: ``instances.labelled``), so an
    unlabelled image teaches no "nothing here"; none labelled: 0, connected to the head's graph.

    ``__call__(head_output, batch)`` takes the head's training output and the :class:`Batch`: its ``boxes``
    (detection heads) or ``instances`` (segment heads: per-instance masks, ``overlap_mask`` False) in
    ultralytics' target format; returns the scalar and the criterion's detached parts (``box``, ``cls``,
    ``dfl``, ``seg`` ...). Gains: ultralytics' defaults (``box`` 7.5, ``cls`` 0.5, ``dfl`` 1.5), overridable
    here. YOLO26's one-to-many / one-to-one gains (0.8 / 0.2 falling to 0.1 / 0.9) follow the epoch as in
    ultralytics' trainer (:meth:`on_epoch_start`, which vfmkd's trainer calls at each epoch start) over the run's
    ``train.epochs``, or over ``epochs`` when given."""

    def __init__(self, head: Any, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5,
                 epochs: Optional[int] = None) -> None:
        if not hasattr(head, "model_class") or not hasattr(head, "detect"):
            raise ValueError(f"the ultralytics loss trains an ultralytics_detect / ultralytics_segment head, got "
                             f"{type(head).__name__}; use the detection / instance_segmentation loss for vfmkd heads")
        self.epochs = epochs
        hyp = IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, "box": box, "cls": cls, "dfl": dfl,
                                         "epochs": epochs or DEFAULT_CFG_DICT["epochs"], "overlap_mask": False})
        # ultralytics' criteria read hyper-parameters from `model.args`, the head from `model.model[-1]` and the
        # device from `model.parameters()`; a namespace gives them exactly that view of the head.
        view = SimpleNamespace(args=hyp, model=[head.detect], parameters=head.parameters)
        self.segment = head.task == "instance"
        self._loss = head.model_class.init_criterion(view)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Epoch ``epoch`` (1-based) of ``epochs`` (the loss's own ``epochs`` when given) begins: an end-to-end
        criterion's one-to-many -> one-to-one gains become what ultralytics' trainer has at that epoch (it
        calls ``update()`` after each epoch and, resuming, sets ``updates`` and calls it once: the same here,
        from the epoch alone). Criteria without a schedule have nothing to set."""
        if not hasattr(self._loss, "update"):
            return
        for criterion in (self._loss.one2many, self._loss.one2one):
            criterion.hyp.epochs = self.epochs or epochs
        # ultralytics' 0-based epoch e = epoch - 1 starts after e updates (a warm-up epoch 0 counts as the first)
        self._loss.updates = max(epoch, 1) - 2
        self._loss.update()

    def __call__(self, head_output: Any, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self.segment:
            if batch.instances is None:
                raise ValueError("the ultralytics loss of a segment head needs instance labels: build the dataset "
                                 "with instances=True (the instance task does)")
            targets, labelled = dict(batch.instances.as_loss_input()), batch.instances.labelled
        else:
            targets, labelled = dict(batch.boxes.as_loss_input()), batch.labelled
        # unlabelled images are unknown, not empty: the criterion runs on the labelled ones alone
        output, targets, images = labelled_part(head_output, targets, labelled, batch.images.shape[0])
        if not images:
            zero = graph_zero(*tensors_in(head_output))
            return zero, {name.replace("_loss", ""): zero.detach() for name in self._part_names()}
        if self.segment:
            targets["sem_masks"] = semantic_masks(targets, images)  # YOLO26-seg's semantic branch
        total, items = self._loss(output, targets)  # total: (parts,), summed over the images
        return total.sum() / images, {k.replace("_loss", ""): v for k, v in items.items()}

    def _part_names(self) -> Tuple[str, ...]:
        """The criterion's part names (an end-to-end criterion reports its one-to-one branch's)."""
        return tuple(getattr(self._loss, "one2one", self._loss).loss_names)


def labelled_part(head_output: Any, targets: Dict[str, torch.Tensor], labelled: Optional[torch.Tensor],
                  images: int) -> Tuple[Any, Dict[str, torch.Tensor], int]:
    """(head output, ultralytics targets, images) of the labelled images of a batch of ``images``:
    ``labelled`` (B,) bool (None: all); the output sliced along the batch dimension, the target rows of
    those images with ``batch_idx`` renumbered among them."""
    if labelled is None or bool(labelled.all()):
        return head_output, targets, images
    sliced, rows, index = labelled_images(head_output, labelled, targets["batch_idx"])
    part = {k: v[rows] for k, v in targets.items() if k != "batch_idx"}
    part["batch_idx"] = index
    return sliced, part, int(labelled.sum())


def semantic_masks(targets: Dict[str, torch.Tensor], images: int) -> torch.Tensor:
    """(B, h, w) float class ids per mask pixel from per-instance ``masks`` (N, h, w), ``cls`` (N, 1) and
    ``batch_idx`` (N,): where instances overlap the smallest wins, 0 where none covers (ultralytics' Format
    transform builds YOLO26-seg's ``sem_masks`` by the same rule; its loss zeroes the uncovered pixels)."""
    masks, cls, idx = targets["masks"], targets["cls"].view(-1), targets["batch_idx"].view(-1).long()
    out = torch.zeros(images, *masks.shape[-2:], device=masks.device)
    for i in range(images):
        own = masks[idx == i].bool()
        if not len(own):
            continue
        area = own.sum(dim=(1, 2)).float()
        key = torch.where(own, area[:, None, None], area.max() + 1)
        out[i] = cls[idx == i][key.min(0).indices].float() * own.any(0)
    return out

