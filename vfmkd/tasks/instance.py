"""Instance segmentation: boxes, classes and per-instance masks from prototypes (``yolo_seg_head``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from ultralytics.utils.ops import process_mask

from vfmkd.core.registry import TASKS
from vfmkd.datasets.records import Batch
from vfmkd.tasks.base import Task
from vfmkd.tasks.detection import DetectionOutput, raw_prediction_dict, read_detection_fields
from vfmkd.tasks.pictures import PanelRow, PictureContext, Prediction, picture_detections, split_by_image
from vfmkd.tasks.scoring.context import ScoringContext
from vfmkd.tasks.scoring.panoptic_metrics import THINGS
from vfmkd.tasks.scoring.seg_metrics import InstanceScorer


@dataclass
class InstanceOutput(DetectionOutput):
    """A :class:`DetectionOutput` plus masks: ``mask_coefficients`` (B, nm, A) per anchor over
    ``proto`` (B, nm, S/4, S/4) prototype masks. In eval, ``predictions`` is (B, 4 + nc + nm, A)
    (the coefficients follow the class probabilities, ultralytics' layout)."""

    mask_coefficients: torch.Tensor
    proto: torch.Tensor

    def mask_logits(self, anchors: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, S/4, S/4) of anchor ``anchors[n]`` (indices into A) of image ``batch_idx[n]``:
        its coefficients times its image's prototypes (differentiable in both; not cropped)."""
        b = batch_idx.long().to(self.proto.device)
        picked = self.mask_coefficients[b, :, anchors.long().to(self.proto.device)]  # (N, nm)
        return torch.einsum("nm,nmhw->nhw", picked, self.proto[b])


@TASKS.register("instance")
class InstanceTask(Task):
    """Per-instance masks with boxes and classes; loads the instance polygons."""

    name = "instance"
    label_kinds = frozenset({"instances"})
    box_classes = True
    default_loss = "instance_segmentation"
    canvas_stride = True
    teacher_tasks = ("instance",)
    output_type = InstanceOutput

    primary_metric = ("mask_mAP50-95", "maskmAP")
    best_rank = 1
    panoptic_part = THINGS

    def read_output(self, raw: Any) -> InstanceOutput:
        parts = raw_prediction_dict(raw)
        return InstanceOutput(raw=raw, mask_coefficients=parts["mask_coefficient"], proto=parts["proto"],
                              **read_detection_fields(raw))

    def build_scorer(self, head: str, context: ScoringContext) -> InstanceScorer:
        return InstanceScorer(context.box_names, context.conf, context.iou, context.max_det, head=head,
                              read_output=self.read_output)

    def picture_row(self, head: str, output: InstanceOutput, batch: Batch, context: PictureContext) -> PanelRow:
        """Student: the confident instances' masks and boxes; ground truth: the instance masks; teacher:
        its box-prompted masks."""
        n, size = len(batch), batch.images.shape[-1]
        dets = picture_detections(output.predictions, len(context.box_names))
        masks = [process_mask(output.proto[i].float().cpu(), d[:, 6:], d[:, :4], (size, size), upsample=True) > 0.5
                 if len(d) else torch.zeros(0, size, size, dtype=torch.bool) for i, d in enumerate(dets)]
        inst = batch.instances
        if inst is None:
            raise ValueError(f"head {head}: drawing an instance head needs instance labels (dataset built with "
                             "instances=True)")
        idx = inst.batch_idx.long().cpu()
        return PanelRow(head,
                        Prediction.instances(masks, [d[:, 5] for d in dets], [d[:, :4] for d in dets]),
                        context.teacher_masks,
                        Prediction.instances([m > 0.5 for m in split_by_image(inst.masks.cpu(), idx, n)],
                                             split_by_image(inst.cls.view(-1).cpu(), idx, n)),
                        class_names=context.box_names)
