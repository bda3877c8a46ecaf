"""Instance segmentation: boxes, classes and per-instance masks from prototypes (``yolo_seg_head``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vfmkd.core.registry import TASKS
from vfmkd.tasks.base import Task
from vfmkd.tasks.detection import DetectionOutput, raw_prediction_dict, read_detection_fields


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

    def read_output(self, raw: Any) -> InstanceOutput:
        parts = raw_prediction_dict(raw)
        return InstanceOutput(raw=raw, mask_coefficients=parts["mask_coefficient"], proto=parts["proto"],
                              **read_detection_fields(raw))
