"""Output pairings with a vfmkd teacher (rule source "heads"): the raw training outputs of the
teacher's heads on the student canvas, compared mask by mask (instance), anchor by anchor
(detection/instance class scores) or cell by cell (semantic/binary); :func:`head_pair` picks the
one of a rule."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from vfmkd.datasets.records import Batch
from vfmkd.distillation.pairing.mask_grid import box_cells, canvas_boxes_xyxy, content_cells
from vfmkd.distillation.pairing.mask_pairs import as_two_class
from vfmkd.distillation.pairing.output_rules import OutputRule
from vfmkd.distillation.targets import TeacherTargets


def instance_head_pair(head: Any, output: Any, teacher_output: Any, batch: Batch
                       ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """mask_distill on an instance head with a vfmkd teacher's instance head: every detection box
    of the view, the anchor matched by the same rule on each model's own output."""
    det = batch.boxes
    if len(det.cls) == 0:
        return None
    proto = head.raw(output)["proto"]
    device, size = proto.device, batch.images.shape[-1]
    grid_hw = tuple(proto.shape[-2:])
    boxes = canvas_boxes_xyxy(det.bboxes.to(device), size)
    cls, idx = det.cls.to(device).view(-1).long(), det.batch_idx.to(device).long()
    student = head.instance_mask_logits(output, boxes, cls, idx)
    with torch.no_grad():
        teacher = head.instance_mask_logits(teacher_output, boxes, cls, idx)
    if teacher.shape != student.shape:
        raise ValueError(f"the teacher's instance masks {tuple(teacher.shape)} and the student's "
                         f"{tuple(student.shape)} differ: the vfmkd teacher must run at the student's img_size")
    weight = box_cells(boxes, grid_hw, size // grid_hw[1]).float()
    return student[None], teacher[None], weight[None]


def scores_of(output: Any) -> torch.Tensor:
    """(B, nc, A) class logits of a detection/instance head's raw (training) or eval output."""
    raw = output if isinstance(output, dict) else output[1]
    return raw["scores"]


def check_same(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; a vfmkd teacher "
                         f"must see the student's canvas (its img_size equal to data.img_size, the same head strides)")


def dense_pair(
    student: torch.Tensor, teacher: torch.Tensor, batch: Batch
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A vfmkd teacher's dense logits (B, K, h, w) on the student's grid (bilinear when its output
    stride differs) and the (B, 1, H, W) content weight."""
    if student.shape[:2] != teacher.shape[:2]:
        check_same(student, teacher, "dense head logits")
    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher.float(), size=tuple(student.shape[-2:]), mode="bilinear", align_corners=False)
    h, w = student.shape[-2:]
    weight = content_cells(batch, (h, w), batch.images.shape[-1] // w, student.device).float()[:, None]
    return student, teacher.detach().float(), weight


def head_pair(rule: OutputRule, head: Any, output: Any, batch: Batch, target: TeacherTargets, mode: str = "sigmoid"
              ) -> Optional[Tuple[tuple, dict]]:
    """Loss arguments ``(args, kwargs)`` of a rule with source "heads" (a vfmkd teacher)."""
    outputs = target.head_outputs
    if outputs is None or rule.teacher_head not in outputs:
        return None
    teacher_output = outputs[rule.teacher_head]
    if rule.task in ("detection", "instance"):
        if rule.loss == "mask_distill":
            pair = instance_head_pair(head, output, teacher_output, batch)
            return None if pair is None else (pair, {})
        s, t = scores_of(output), scores_of(teacher_output)
        check_same(s, t, f"class scores of head '{rule.teacher_head}'")
        if rule.loss == "cls_distill":
            return (s, t.detach()), {}
        k = s.shape[1]
        return (s.permute(0, 2, 1).reshape(-1, k), t.detach().permute(0, 2, 1).reshape(-1, k)), {}
    s, t, weight = dense_pair(output, teacher_output, batch)
    if rule.loss == "mask_distill":
        return (s, t, weight), {}
    if rule.loss == "cls_distill":
        return (s.flatten(2), t.flatten(2), weight.flatten(1)), {"class_dim": 1}
    if rule.task == "binary":
        return (as_two_class(s[:, 0].reshape(-1)), as_two_class(t[:, 0].reshape(-1)), weight.reshape(-1)), {}
    k = s.shape[1]
    return (s.permute(0, 2, 3, 1).reshape(-1, k), t.permute(0, 2, 3, 1).reshape(-1, k), weight.reshape(-1)), {}

