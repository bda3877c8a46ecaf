"""YOLOv8 detection task loss: ultralytics' v8DetectionLoss on the student's detection head."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, Tuple

import torch
from ultralytics.utils.loss import v8DetectionLoss

from vfmkd.core.registry import LOSSES
from vfmkd.datasets.records import Batch
from vfmkd.distillation.losses.task import TaskLoss, graph_zero, labelled_boxes
from vfmkd.models.heads.yolo_head import YOLOv8DetectHead


@LOSSES.register("detection")
class DetectionLoss(TaskLoss):
    """box (CIoU) + cls (BCE) + DFL, each with ultralytics' gain, averaged per image.

    ``__call__(head_output, batch)`` takes the training dict of the head the loss entry names
    (``head:``, default ``detection``; the engine routes it) and the :class:`Batch`, whose
    ``boxes`` it reads (``cls`` (N, 1), ``bboxes`` (N, 4) normalised xywh, ``batch_idx`` (N,)), on its
    labelled images only (``batch.labelled``; none labelled: 0), and returns the scalar loss and its
    detached components ``box``/``cls``/``dfl``.
    """

    def __init__(self, head: YOLOv8DetectHead, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5) -> None:
        # v8DetectionLoss reads hyper-parameters from `model.args` and the Detect module from
        # `model.model[-1]`; a namespace gives it exactly that view of our head.
        view = SimpleNamespace(args=SimpleNamespace(box=box, cls=cls, dfl=dfl), model=[head.detect],
                               parameters=head.parameters)
        self._loss = v8DetectionLoss(view)

    def __call__(
        self, head_output: Dict[str, torch.Tensor], batch: Batch
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        output, boxes, images = labelled_boxes(head_output, batch)  # unlabelled images (Batch.labelled) left out
        if not images:
            zero = graph_zero(*(v for v in head_output.values() if torch.is_tensor(v)))
            return zero, {k: zero.detach() for k in ("box", "cls", "dfl")}
        total, items = self._loss(output, boxes.as_loss_input())  # total: (3,) summed over the batch
        return total.sum() / images, {k.replace("_loss", ""): v for k, v in items.items()}
