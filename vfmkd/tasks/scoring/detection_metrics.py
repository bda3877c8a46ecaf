"""Scoring a detection head: precision, recall, mAP50 and mAP50-95 with ultralytics' metric code,
boxes scored in original image pixels."""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping

import numpy as np
import torch
from ultralytics.engine.validator import BaseValidator
from ultralytics.utils.metrics import DetMetrics, box_iou
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import xywh2xyxy

from vfmkd.datasets.records import Batch
from vfmkd.models.unified_model import StudentOutput
from vfmkd.tasks.scoring.common import IOU_THRESHOLDS, to_original_boxes

if TYPE_CHECKING:
    from vfmkd.tasks.detection import DetectionOutput


class DetectionScorer:
    """Accumulates ultralytics' DetMetrics over batches; ``result()`` -> precision, recall, mAP50,
    mAP50-95 and images, with boxes scored in original image pixels. ``read_output``: the task's reader
    of the head's raw output (:meth:`vfmkd.tasks.detection.DetectionTask.read_output`)."""

    def __init__(self, names: Mapping[int, str], conf: float, iou: float, max_det: int,
                 head: str = "detection", *, read_output: Callable[[Any], DetectionOutput]) -> None:
        self.metrics = DetMetrics(names=dict(names))
        self.nc, self.conf, self.iou, self.max_det, self.head = len(names), conf, iou, max_det, head
        self.read_output = read_output
        # ultralytics' greedy prediction/label matching lives on its validator; it only needs `iouv`.
        self.matcher = SimpleNamespace(iouv=IOU_THRESHOLDS)
        self.images = 0

    def update(self, out: StudentOutput, batch: Batch) -> None:
        preds = self.read_output(out.heads[self.head]).predictions
        dets = non_max_suppression(preds, conf_thres=self.conf, iou_thres=self.iou, max_det=self.max_det, nc=self.nc)
        size = torch.tensor([batch.images.shape[3], batch.images.shape[2]] * 2, dtype=torch.float32)
        for i, det in enumerate(dets):
            det = det.float().cpu()
            gt_cls, gt_xywh = (t.cpu() for t in batch.boxes.of_image(i))
            affine = batch.views.affine[i]
            gt_boxes = to_original_boxes(xywh2xyxy(gt_xywh.float()) * size, affine)
            pred_boxes = to_original_boxes(det[:, :4], affine)
            if len(det) and len(gt_cls):
                tp = BaseValidator.match_predictions(self.matcher, det[:, 5], gt_cls,
                                                     box_iou(gt_boxes, pred_boxes)).numpy()
            else:
                tp = np.zeros((len(det), len(IOU_THRESHOLDS)), dtype=bool)
            self.metrics.update_stats({
                "tp": tp, "conf": det[:, 4].numpy(), "pred_cls": det[:, 5].numpy(), "target_cls": gt_cls.numpy(),
                "target_img": np.unique(gt_cls.numpy()), "im_name": batch.image_ids[i],
            })
            self.images += 1

    def result(self) -> Dict[str, float]:
        self.metrics.process(plot=False)
        precision, recall, map50, map5095 = (float(v) for v in self.metrics.mean_results())
        return {"precision": precision, "recall": recall, "mAP50": map50, "mAP50-95": map5095, "images": self.images}
