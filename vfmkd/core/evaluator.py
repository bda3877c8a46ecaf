"""Detection evaluation (precision, recall, mAP50, mAP50-95) with ultralytics' metric code."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, Mapping

import numpy as np
import torch
from tqdm import tqdm
from ultralytics.engine.validator import BaseValidator
from ultralytics.utils.metrics import DetMetrics, box_iou
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import xywh2xyxy

from vfmkd.models.unified_model import UnifiedModel

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)


def _to_original(boxes_xyxy: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Student input pixels -> original image pixels (undo the letterbox)."""
    sx, sy, ox, oy = affine.tolist()
    out = boxes_xyxy.clone()
    out[:, [0, 2]] = (out[:, [0, 2]] - ox) / sx
    out[:, [1, 3]] = (out[:, [1, 3]] - oy) / sy
    return out


@torch.no_grad()
def evaluate_detection(
    model: UnifiedModel,
    loader,
    names: Mapping[int, str],
    device: torch.device,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    head: str = "detection",
    progress: bool = True,
) -> Dict[str, float]:
    """Run the detection head over ``loader`` and score it against its labels in original pixels.

    Returns ``precision``, ``recall``, ``mAP50``, ``mAP50-95`` and ``images``.
    """
    was_training = model.training
    model.eval()
    metrics = DetMetrics(names=dict(names))
    # ultralytics' greedy prediction/label matching lives on its validator; it only needs `iouv`.
    matcher = SimpleNamespace(iouv=IOU_THRESHOLDS)
    n_images = 0
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images = batch["images"].to(device, non_blocking=True)
        preds = model(images).heads[head][0]
        dets = non_max_suppression(preds, conf_thres=conf, iou_thres=iou, max_det=max_det, nc=len(names))
        size = torch.tensor([images.shape[3], images.shape[2]] * 2, dtype=torch.float32)
        for i, det in enumerate(dets):
            det = det.float().cpu()
            in_image = batch["batch_idx"] == i
            gt_cls = batch["cls"][in_image].view(-1).float()
            gt_boxes = _to_original(xywh2xyxy(batch["bboxes"][in_image].float()) * size, batch["affine"][i])
            pred_boxes = _to_original(det[:, :4], batch["affine"][i])
            if len(det) and len(gt_cls):
                tp = BaseValidator.match_predictions(matcher, det[:, 5], gt_cls, box_iou(gt_boxes, pred_boxes)).numpy()
            else:
                tp = np.zeros((len(det), len(IOU_THRESHOLDS)), dtype=bool)
            metrics.update_stats(
                {
                    "tp": tp,
                    "conf": det[:, 4].numpy(),
                    "pred_cls": det[:, 5].numpy(),
                    "target_cls": gt_cls.numpy(),
                    "target_img": np.unique(gt_cls.numpy()),
                    "im_name": batch["image_ids"][i],
                }
            )
            n_images += 1
    metrics.process(plot=False)
    precision, recall, map50, map5095 = (float(v) for v in metrics.mean_results())
    model.train(was_training)
    return {"precision": precision, "recall": recall, "mAP50": map50, "mAP50-95": map5095, "images": n_images}
