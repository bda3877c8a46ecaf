"""Segmentation scorers with the interface of :class:`vfmkd.tasks.scoring.detection_metrics.DetectionScorer`:
``update(out, batch)`` per batch (reading the output of the head they are given by name with the
``read_output`` of its task: the typed output record) and ``result()`` at the end.

- :class:`InstanceScorer`: box and mask precision, recall, mAP50, mAP50-95 (ultralytics' metric code).
- :class:`SemanticScorer`: mIoU, pixel accuracy, per-class IoU (torchmetrics) at original resolution.
- :class:`BinaryScorer`: Dice, IoU, pixel accuracy (torchmetrics) and HD95 (MONAI) at original resolution.
"""
from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from ultralytics.engine.validator import BaseValidator
from ultralytics.utils.metrics import SegmentMetrics, box_iou, mask_iou
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import process_mask, xywh2xyxy

from vfmkd.datasets.records import Batch
from vfmkd.models.unified_model import StudentOutput
from vfmkd.tasks.scoring.common import IOU_THRESHOLDS, LOCAL_METRIC, to_original_boxes, unletterbox, upsampled

if TYPE_CHECKING:
    from vfmkd.tasks.binary import BinaryOutput
    from vfmkd.tasks.instance import InstanceOutput
    from vfmkd.tasks.semantic import SemanticOutput


class InstanceScorer:
    """Box and mask metrics of an instance head (``yolo_seg_head``) with ultralytics'
    ``SegmentMetrics``: NMS as ``DetectionScorer`` does, ultralytics' greedy matching
    (``BaseValidator.match_predictions``) at IoU 0.50:0.05:0.95.

    Space: boxes are scored in original image pixels (as ``DetectionScorer``); masks in canvas
    space on the prototype grid (S/4 x S/4), as ultralytics' validator does: predicted masks from
    ``ops.process_mask`` (coefficients @ prototypes, > 0, cropped to the box) against the batch's
    instance masks, IoU by ``metrics.mask_iou``. Images without instance labels
    (``batch.instances.labelled`` False) are skipped and counted (``skipped``), not scored as
    images with no objects.

    ``result()``: ``precision``, ``recall``, ``mAP50``, ``mAP50-95`` (boxes), ``mask_precision``,
    ``mask_recall``, ``mask_mAP50``, ``mask_mAP50-95``, ``images``, ``skipped``.
    """

    def __init__(self, names: Mapping[int, str], conf: float = 0.001, iou: float = 0.7, max_det: int = 300,
                 head: str = "instance", *, read_output: Callable[[Any], InstanceOutput]) -> None:
        self.metrics = SegmentMetrics(names=dict(names))
        self.nc, self.conf, self.iou, self.max_det, self.head = len(names), conf, iou, max_det, head
        self.read_output = read_output
        self.matcher = SimpleNamespace(iouv=IOU_THRESHOLDS)  # match_predictions only reads `iouv`
        self.images = self.skipped = 0

    def update(self, out: StudentOutput, batch: Batch) -> None:
        output = self.read_output(out.heads[self.head])
        preds, proto = output.predictions, output.proto
        if batch.instances is None:
            raise ValueError("InstanceScorer: the batch carries no instance targets (dataset built without "
                             "instances=True)")
        inst = batch.instances
        dets = non_max_suppression(preds, conf_thres=self.conf, iou_thres=self.iou, max_det=self.max_det, nc=self.nc)
        canvas = (batch.images.shape[2], batch.images.shape[3])
        size = torch.tensor([canvas[1], canvas[0]] * 2, dtype=torch.float32)
        batch_idx = inst.batch_idx.view(-1).long().cpu()
        for i, det in enumerate(dets):
            if not bool(inst.labelled[i]):
                self.skipped += 1
                continue
            det = det.float().cpu()
            rows = batch_idx == i
            gt_cls = inst.cls.view(-1)[rows].float().cpu()
            gt_canvas = xywh2xyxy(inst.bboxes[rows].float().cpu()) * size
            gt_masks = inst.masks[rows].float().cpu()
            affine = batch.views.affine[i]
            pred_masks = process_mask(proto[i].float().cpu(), det[:, 6:], det[:, :4], shape=canvas)
            if len(det) and pred_masks.shape[-2:] != gt_masks.shape[-2:]:  # prototypes on another grid (DSRL input)
                pred_masks = F.interpolate(pred_masks[None].float(), size=gt_masks.shape[-2:], mode="nearest")[0]
            if len(det) and len(gt_cls):
                box_ious = box_iou(to_original_boxes(gt_canvas, affine), to_original_boxes(det[:, :4], affine))
                tp = BaseValidator.match_predictions(self.matcher, det[:, 5], gt_cls, box_ious).numpy()
                m_ious = mask_iou(gt_masks.flatten(1), pred_masks.flatten(1).float())
                tp_m = BaseValidator.match_predictions(self.matcher, det[:, 5], gt_cls, m_ious).numpy()
            else:
                tp = tp_m = np.zeros((len(det), len(IOU_THRESHOLDS)), dtype=bool)
            self.metrics.update_stats({
                "tp": tp, "tp_m": tp_m, "conf": det[:, 4].numpy(), "pred_cls": det[:, 5].numpy(),
                "target_cls": gt_cls.numpy(), "target_img": np.unique(gt_cls.numpy()), "im_name": batch.image_ids[i],
            })
            self.images += 1

    def result(self) -> Dict[str, float]:
        self.metrics.process(plot=False)
        values = [float(v) for v in self.metrics.mean_results()]
        keys = ("precision", "recall", "mAP50", "mAP50-95", "mask_precision", "mask_recall", "mask_mAP50",
                "mask_mAP50-95")
        return {**dict(zip(keys, values)), "images": self.images, "skipped": self.skipped}


class SemanticScorer:
    """mIoU, pixel accuracy and per-class IoU of a semantic head at the original image resolution.

    Logits are bilinearly resized to the canvas, argmax'd, then the prediction and the canvas target
    are un-letterboxed (:func:`unletterbox`). Pixels of class 0 (unlabeled) are ignored; images
    without a semantic mask (all 0) therefore add nothing. torchmetrics accumulates the confusion
    matrix: ``MulticlassJaccardIndex(average=None, ignore_index=0)`` and
    ``MulticlassAccuracy(average="micro", ignore_index=0)``.

    ``result()``: ``mIoU`` = mean IoU over the classes k >= 1 present in the ground truth or the
    prediction of the split (absent classes are neither 0 nor 1: they are left out), ``pixel_accuracy``
    (correct / labelled pixels), ``per_class_iou`` {name: IoU} for those classes, ``images``.
    ``names``: class index -> name, index 0 included (``num_classes = len(names)``).
    """

    def __init__(self, names: Mapping[int, str], head: str = "semantic", *,
                 read_output: Callable[[Any], SemanticOutput]) -> None:
        self.names = dict(names)
        self.num_classes, self.head, self.read_output = len(self.names), head, read_output
        # torchmetrics is imported where a split is scored: its package import loads transformers (its text
        # metrics) whenever transformers is installed (the sam3 teacher needs it), ~1 s per process start
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.jaccard = MulticlassJaccardIndex(self.num_classes, average=None, ignore_index=0, **LOCAL_METRIC)
        self.accuracy = MulticlassAccuracy(self.num_classes, average="micro", ignore_index=0, **LOCAL_METRIC)
        self.images = 0

    def update(self, out: StudentOutput, batch: Batch) -> None:
        if batch.semantic is None:
            raise ValueError("SemanticScorer: the batch carries no semantic targets (dataset built without "
                             "semantic=True)")
        logits = self.read_output(out.heads[self.head]).logits
        pred = upsampled(logits, batch.semantic.shape[-2:]).argmax(1).cpu()  # (B, S, S)
        target = batch.semantic.long().cpu()
        for i in range(len(batch)):
            p, t = unletterbox(pred[i], batch, i), unletterbox(target[i], batch, i)
            self.jaccard.update(p.view(1, -1), t.view(1, -1))
            self.accuracy.update(p.view(1, -1), t.view(1, -1))
            self.images += 1

    def result(self) -> Dict[str, Any]:
        ious = self.jaccard.compute()
        confmat = self.jaccard.confmat  # (K, K) rows: target, cols: prediction (ignored pixels dropped)
        present = [k for k in range(1, self.num_classes) if int(confmat[k].sum() + confmat[:, k].sum()) > 0]
        per_class = {self.names[k]: float(ious[k]) for k in present}
        miou = sum(per_class.values()) / len(per_class) if per_class else float("nan")
        labelled = int(confmat.sum())
        accuracy = float(self.accuracy.compute()) if labelled else float("nan")
        return {"mIoU": miou, "pixel_accuracy": accuracy, "per_class_iou": per_class, "images": self.images}


class BinaryScorer:
    """Dice, IoU, pixel accuracy and HD95 of a binary head at the original image resolution.

    Foreground = logit > 0 (sigmoid > 0.5) after bilinear resizing to the canvas; prediction and
    target are un-letterboxed (:func:`unletterbox`). Target pixels 255 are ignored. Dice, IoU and
    accuracy are accumulated over all labelled pixels of the split by torchmetrics
    (``BinaryF1Score`` = Dice = 2TP / (2TP + FP + FN), ``BinaryJaccardIndex``, ``BinaryAccuracy``,
    each with ``ignore_index=255``).

    HD95: MONAI ``compute_hausdorff_distance(percentile=95)`` (symmetric, Euclidean, in pixels of
    the original image) per image, averaged over the images where both the ground truth and the
    prediction have foreground. An image where either is empty has no defined distance: it is
    skipped and counted (``hd95_skipped_empty``); ``hd95`` is NaN when every image was skipped.
    Ignored (255) pixels count as background for HD95. Images with no labelled pixel (no binary
    mask) are left out of everything (``unlabelled``).

    ``result()``: ``dice``, ``iou``, ``pixel_accuracy``, ``hd95``, ``hd95_images``,
    ``hd95_skipped_empty``, ``images``, ``unlabelled``.
    """

    def __init__(self, head: str = "binary", *, read_output: Callable[[Any], BinaryOutput]) -> None:
        self.head, self.read_output = head, read_output
        from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, BinaryJaccardIndex  # see SemanticScorer

        self.dice = BinaryF1Score(ignore_index=255, **LOCAL_METRIC)
        self.iou = BinaryJaccardIndex(ignore_index=255, **LOCAL_METRIC)
        self.accuracy = BinaryAccuracy(ignore_index=255, **LOCAL_METRIC)
        self.hd_sum, self.hd_images, self.hd_skipped = 0.0, 0, 0
        self.images = self.unlabelled = 0

    def update(self, out: StudentOutput, batch: Batch) -> None:
        if batch.binary is None:
            raise ValueError("BinaryScorer: the batch carries no binary targets (dataset built without binary_classes)")
        logits = self.read_output(out.heads[self.head]).logits
        pred = (upsampled(logits, batch.binary.shape[-2:])[:, 0] > 0).to(torch.uint8).cpu()
        target = batch.binary.to(torch.uint8).cpu()
        for i in range(len(batch)):
            p, t = unletterbox(pred[i], batch, i), unletterbox(target[i], batch, i)
            if not bool((t != 255).any()):
                self.unlabelled += 1
                continue
            for metric in (self.dice, self.iou, self.accuracy):
                metric.update(p.view(1, -1), t.view(1, -1))
            self.images += 1
            self._hd95(p, t == 1)

    def _hd95(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        pred = pred.bool()
        if not bool(gt.any()) or not bool(pred.any()):
            self.hd_skipped += 1
            return
        # imported here: MONAI's import costs seconds at every tool start and only HD95 needs it
        from monai.metrics import compute_hausdorff_distance

        with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal call (get_mask_edges)
            warnings.simplefilter("ignore", FutureWarning)
            hd = compute_hausdorff_distance(pred[None, None].float(), gt[None, None].float(), include_background=True,
                                            percentile=95)
        self.hd_sum += float(hd.view(-1)[0])
        self.hd_images += 1

    def result(self) -> Dict[str, Any]:
        scored = self.images > 0
        return {
            "dice": float(self.dice.compute()) if scored else float("nan"),
            "iou": float(self.iou.compute()) if scored else float("nan"),
            "pixel_accuracy": float(self.accuracy.compute()) if scored else float("nan"),
            "hd95": self.hd_sum / self.hd_images if self.hd_images else float("nan"),
            "hd95_images": self.hd_images,
            "hd95_skipped_empty": self.hd_skipped,
            "images": self.images,
            "unlabelled": self.unlabelled,
        }
