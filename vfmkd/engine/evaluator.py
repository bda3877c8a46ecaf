"""Evaluation on a held-out split: detection mAP with ultralytics' metric code, and the fidelity of
the distilled features (student-teacher cosine and MSE per teacher and level)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm
from ultralytics.engine.validator import BaseValidator
from ultralytics.utils.metrics import DetMetrics, box_iou
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import xywh2xyxy

from vfmkd.datasets.records import Batch
from vfmkd.distillation.cached import DistillBatch
from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.routing import TeacherRouter
from vfmkd.models.unified_model import StudentOutput, UnifiedModel

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)


def _to_original(boxes_xyxy: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Student input pixels -> original image pixels (undo the letterbox)."""
    sx, sy, ox, oy = affine.tolist()
    out = boxes_xyxy.clone()
    out[:, [0, 2]] = (out[:, [0, 2]] - ox) / sx
    out[:, [1, 3]] = (out[:, [1, 3]] - oy) / sy
    return out


class DetectionScorer:
    """Accumulates ultralytics' DetMetrics over batches; ``result()`` -> precision, recall, mAP50,
    mAP50-95 and images, with boxes scored in original image pixels."""

    def __init__(self, names: Mapping[int, str], conf: float, iou: float, max_det: int, head: str = "detection") -> None:
        self.metrics = DetMetrics(names=dict(names))
        self.nc, self.conf, self.iou, self.max_det, self.head = len(names), conf, iou, max_det, head
        # ultralytics' greedy prediction/label matching lives on its validator; it only needs `iouv`.
        self.matcher = SimpleNamespace(iouv=IOU_THRESHOLDS)
        self.images = 0

    def update(self, out: StudentOutput, batch: Batch) -> None:
        preds = out.heads[self.head][0]
        dets = non_max_suppression(preds, conf_thres=self.conf, iou_thres=self.iou, max_det=self.max_det, nc=self.nc)
        size = torch.tensor([batch.images.shape[3], batch.images.shape[2]] * 2, dtype=torch.float32)
        for i, det in enumerate(dets):
            det = det.float().cpu()
            gt_cls, gt_xywh = (t.cpu() for t in batch.boxes.of_image(i))
            affine = batch.views.affine[i]
            gt_boxes = _to_original(xywh2xyxy(gt_xywh.float()) * size, affine)
            pred_boxes = _to_original(det[:, :4], affine)
            if len(det) and len(gt_cls):
                tp = BaseValidator.match_predictions(self.matcher, det[:, 5], gt_cls, box_iou(gt_boxes, pred_boxes)).numpy()
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


class FidelityMeter:
    """Held-out agreement of each feature term: mean cosine and MSE over valid cells, keyed
    ``<teacher>/<feature>@<level>`` (the loss entry's name is kept alongside)."""

    def __init__(self, distiller: Distiller) -> None:
        self.distiller = distiller
        self.sums: Dict[str, Tuple[float, float, float]] = {}

    def update(self, out: StudentOutput, batch: Batch, targets: Mapping[str, Any]) -> None:
        for name, (cos, mse, cells) in self.distiller.agreement(out, batch, targets).items():
            c0, m0, n0 = self.sums.get(name, (0.0, 0.0, 0.0))
            self.sums[name] = (c0 + cos, m0 + mse, n0 + cells)

    def result(self) -> Dict[str, Dict[str, Any]]:
        out = {}
        for name, (cos, mse, cells) in sorted(self.sums.items()):
            m = self.distiller.feature_losses[name]
            out[f"{m.teacher}/{m.teacher_feature}@{m.student_level}"] = {
                "loss": name, "cos": cos / max(cells, 1.0), "mse": mse / max(cells, 1.0), "cells": int(cells)}
        return out


@torch.no_grad()
def evaluate(model: UnifiedModel, loader, names: Mapping[int, str], device: torch.device, conf: float = 0.001,
             iou: float = 0.7, max_det: int = 300, progress: bool = True, distiller: Optional[Distiller] = None,
             router: Optional[TeacherRouter] = None) -> Dict[str, Any]:
    """mAP of the detection head over ``loader`` and, with ``distiller`` and ``router`` (whose
    batches carry cached val targets or go to the live teacher), ``fidelity`` per teacher and level."""
    was_training = model.training
    model.eval()
    if distiller is not None:
        distiller.eval()
    scorer = DetectionScorer(names, conf, iou, max_det)
    fidelity = FidelityMeter(distiller) if distiller is not None and router is not None else None
    teachers = list(distiller.teachers_used(active_only=False)) if distiller is not None else []
    if router is not None:
        router.reset_counts()  # the sources of this evaluation only
    for step, item in enumerate(tqdm(loader, desc="eval", leave=False, disable=not progress)):
        item: Union[Batch, DistillBatch]
        batch, cached = (item.batch, item.cached) if isinstance(item, DistillBatch) else (item, {})
        batch = batch.to(device)
        out = model(batch.images)
        scorer.update(out, batch)
        if fidelity is not None and router is not None:
            fidelity.update(out, batch, router.targets(step, batch, cached, teachers))
    result: Dict[str, Any] = dict(scorer.result())
    if fidelity is not None:
        result["fidelity"] = fidelity.result()
        if router is not None:
            result["fidelity_sources"] = router.summary()
    model.train(was_training)
    if distiller is not None:
        distiller.train(was_training)
    return result
