"""Output pairings with a vfmkd teacher (rule source "heads"): the raw training outputs of the
teacher's heads on the student canvas, compared mask by mask (instance), anchor by anchor
(detection/instance class scores) or cell by cell (semantic/binary), each registered under
(loss, "heads", task) in :mod:`vfmkd.distillation.pairing.registry`. The outputs are read through
the student task's typed output (:mod:`vfmkd.tasks`)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from vfmkd.datasets.records import Batch
from vfmkd.distillation.pairing.mask_grid import box_cells, canvas_boxes_xyxy, content_cells
from vfmkd.distillation.pairing.mask_pairs import as_two_class
from vfmkd.distillation.pairing.registry import HEADS, PairFn, register_pairing
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.tasks import task_of


def instance_head_pair(head: Any, output: Any, teacher_output: Any, batch: Batch
                       ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """mask_distill on an instance head with a vfmkd teacher's instance head: every detection box
    of the view, the anchor matched by the same rule on each model's own output."""
    det = batch.boxes
    if len(det.cls) == 0:
        return None
    task = task_of(head)
    read = task.read_output(output)
    device, size = read.proto.device, batch.images.shape[-1]
    grid_hw = tuple(read.proto.shape[-2:])
    boxes = canvas_boxes_xyxy(det.bboxes.to(device), size)
    cls, idx = det.cls.to(device).view(-1).long(), det.batch_idx.to(device).long()
    student = read.mask_logits(head.match_anchors(output, boxes, cls, idx), idx)
    with torch.no_grad():
        anchors = head.match_anchors(teacher_output, boxes, cls, idx)
        teacher = task.read_output(teacher_output).mask_logits(anchors, idx)
    if teacher.shape != student.shape:
        raise ValueError(f"the teacher's instance masks {tuple(teacher.shape)} and the student's "
                         f"{tuple(student.shape)} differ: the vfmkd teacher must run at the student's img_size")
    weight = box_cells(boxes, grid_hw, size // grid_hw[1]).float()
    return student[None], teacher[None], weight[None]


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



# ------------------------------------------------------------------ the registered pairings (teacher kind "heads")
def head_pairing(loss: str, tasks: Iterable[str]) -> Callable[[Callable[..., Any]], PairFn]:
    """Registers ``fn(p, output, teacher_output, batch)`` for (``loss``, "heads", each task): it runs
    when the teacher's targets hold the output of the term's ``teacher_head`` (else nothing pairs)."""
    def decorator(fn: Callable[..., Any]) -> PairFn:
        def pair(p: Any, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
            outputs = target.head_outputs
            if outputs is None or p.rule.teacher_head not in outputs:
                return None
            return fn(p, output, outputs[p.rule.teacher_head], batch)
        pair.__doc__ = fn.__doc__
        return register_pairing(loss, HEADS, tasks)(pair)
    return decorator


def class_scores(p: Any, output: Any, teacher_output: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, nc, A) class logits of the student and (detached) of the teacher head, the same shape."""
    s, t = p.read(output).scores, p.read(teacher_output).scores
    check_same(s, t, f"class scores of head '{p.rule.teacher_head}'")
    return s, t.detach()


@head_pairing("mask_distill", ["instance"])
def instance_masks(p: Any, output: Any, teacher_output: Any, batch: Batch) -> Optional[Tuple[tuple, dict]]:
    """Instance masks of the anchors matched to the view's boxes, on the prototype grid."""
    pair = instance_head_pair(p.head, output, teacher_output, batch)
    return None if pair is None else (pair, {})


@head_pairing("cls_distill", ["detection", "instance"])
def anchor_scores(p: Any, output: Any, teacher_output: Any, batch: Batch) -> Tuple[tuple, dict]:
    """Per-anchor class scores (B, nc, A)."""
    return class_scores(p, output, teacher_output), {}


@head_pairing("kl_divergence", ["detection", "instance"])
def anchor_distribution(p: Any, output: Any, teacher_output: Any, batch: Batch) -> Tuple[tuple, dict]:
    """Per-anchor class distributions: rows (B*A, nc)."""
    s, t = class_scores(p, output, teacher_output)
    k = s.shape[1]
    return (s.permute(0, 2, 1).reshape(-1, k), t.permute(0, 2, 1).reshape(-1, k)), {}


@head_pairing("mask_distill", ["semantic", "binary"])
def dense_masks(p: Any, output: Any, teacher_output: Any, batch: Batch) -> Tuple[tuple, dict]:
    """Every channel, per cell, over the image content."""
    return dense_pair(p.read(output).logits, p.read(teacher_output).logits, batch), {}


@head_pairing("cls_distill", ["semantic", "binary"])
def dense_scores(p: Any, output: Any, teacher_output: Any, batch: Batch) -> Tuple[tuple, dict]:
    """Per-pixel class scores in ultralytics' layout (B, K, H*W)."""
    s, t, weight = dense_pair(p.read(output).logits, p.read(teacher_output).logits, batch)
    return (s.flatten(2), t.flatten(2), weight.flatten(1)), {"class_dim": 1}


@head_pairing("kl_divergence", ["semantic"])
def pixel_distribution(p: Any, output: Any, teacher_output: Any, batch: Batch) -> Tuple[tuple, dict]:
    """Per-pixel softmax over the classes: rows (B*H*W, K)."""
    s, t, weight = dense_pair(p.read(output).logits, p.read(teacher_output).logits, batch)
    k = s.shape[1]
    return (s.permute(0, 2, 3, 1).reshape(-1, k), t.permute(0, 2, 3, 1).reshape(-1, k), weight.reshape(-1)), {}


@head_pairing("kl_divergence", ["binary"])
def pixel_foreground(p: Any, output: Any, teacher_output: Any, batch: Batch) -> Tuple[tuple, dict]:
    """Per-pixel Bernoulli (as 2-class rows) of the binary logit."""
    s, t, weight = dense_pair(p.read(output).logits, p.read(teacher_output).logits, batch)
    return (as_two_class(s[:, 0].reshape(-1)), as_two_class(t[:, 0].reshape(-1)), weight.reshape(-1)), {}
