"""Detection: boxes and class scores (``yolo_head``, ``rtdetr_head``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

import torch
from ultralytics.utils.ops import xywh2xyxy

from vfmkd.core.registry import TASKS
from vfmkd.datasets.records import Batch
from vfmkd.tasks.base import Task
from vfmkd.tasks.pictures import PanelRow, PictureContext, Prediction, picture_detections
from vfmkd.tasks.scoring.context import ScoringContext
from vfmkd.tasks.scoring.detection_metrics import DetectionScorer


@dataclass
class DetectionOutput:
    """A detection head's output, train or eval (A: anchors over all levels, or a DETR's queries).

    ``predictions`` (B, 4 + nc, A): xywh boxes in input pixels and class probabilities (eval only,
    None in training). ``scores`` (B, nc, A): class logits (None for RT-DETR's training pass, which
    returns the decoder inputs only). ``box_distribution`` (B, 4 * reg_max, A): DFL box logits of the
    YOLO heads (None otherwise). ``feats``: the (B, C_l, H_l, W_l) levels the head read (None when
    the output does not carry them). ``raw``: the head's output as it came (ultralytics' layouts,
    what its losses and export read)."""

    predictions: Optional[torch.Tensor]
    scores: Optional[torch.Tensor]
    box_distribution: Optional[torch.Tensor]
    feats: Optional[List[torch.Tensor]]
    raw: Any


def raw_prediction_dict(raw: Any) -> dict:
    """ultralytics' raw prediction dict of a training (dict) or eval (``(predictions, dict)``) output."""
    return raw if isinstance(raw, dict) else raw[1]


def read_detection_fields(raw: Any) -> dict:
    """The :class:`DetectionOutput` fields of a YOLO or RT-DETR head's train/eval output."""
    parts = raw_prediction_dict(raw)
    predictions = None if isinstance(raw, dict) else raw[0]
    if isinstance(predictions, tuple):  # an instance head's eval output: (predictions, proto)
        predictions = predictions[0]
    scores = parts.get("scores")
    if scores is None and parts.get("pred_logits") is not None:  # RT-DETR eval: (B, Q, nc) query logits
        scores = parts["pred_logits"].transpose(1, 2)
    return {"predictions": predictions, "scores": scores, "box_distribution": parts.get("boxes"),
            "feats": parts.get("feats")}


@TASKS.register("detection")
class DetectionTask(Task):
    """Boxes with classes; the head's ``num_classes`` is the box labels' class count."""

    name = "detection"
    box_classes = True
    default_loss = "detection"
    canvas_stride = True
    teacher_tasks = ("detection", "instance")  # an instance head's scores are detection scores
    output_type = DetectionOutput

    primary_metric = ("mAP50-95", "mAP")
    best_rank = 4  # any segmentation head outranks detection

    def read_output(self, raw: Any) -> DetectionOutput:
        return DetectionOutput(raw=raw, **read_detection_fields(raw))

    def build_scorer(self, head: str, context: ScoringContext) -> DetectionScorer:
        return DetectionScorer(context.box_names, context.conf, context.iou, context.max_det, head=head,
                               read_output=self.read_output)

    def fitness(self, scores: Mapping[str, Any]) -> float:
        """ultralytics' fitness: 0.1 mAP50 + 0.9 mAP50-95."""
        return 0.1 * float(scores["mAP50"]) + 0.9 * float(scores["mAP50-95"])

    def picture_row(self, head: str, output: DetectionOutput, batch: Batch, context: PictureContext) -> PanelRow:
        """Student: the confident boxes after NMS; ground truth: the batch's boxes; no teacher column."""
        n, size = len(batch), batch.images.shape[-1]
        dets = picture_detections(output.predictions, len(context.box_names))
        gt = [batch.boxes.of_image(i) for i in range(n)]
        student = Prediction.detections([d[:, :4] for d in dets], [d[:, 5] for d in dets], [d[:, 4] for d in dets])
        target = Prediction.detections([xywh2xyxy(b.cpu().float()) * size for _, b in gt], [c.cpu() for c, _ in gt])
        return PanelRow(head, student, None, target, class_names=context.box_names)
