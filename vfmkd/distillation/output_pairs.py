"""Output distillation: pair what a student head predicts with what a teacher predicts for the same thing.

A loss entry of kind ``output`` (``kl_divergence``, ``cls_distill``, ``mask_distill``) names a
``teacher`` and a student ``head``. What the teacher provides decides the pairing:

* **mask teachers** (``can_segment``: SAM, LoRA-SAM, SAM2) give box-prompted mask logits
  (:class:`~vfmkd.distillation.targets.MaskLogits`, one per detection-label box, on the teacher
  canvas at stride 4). They are carried onto the student head's grid by the feature geometry
  (:func:`~vfmkd.distillation.geometry.resample_to_student`: RoIAlign averages the logits each
  student cell covers; cells outside the teacher's valid region get weight 0).
* **vfmkd teachers** (a trained vfmkd model) give the raw training outputs of their heads on the
  student canvas (``TeacherTargets.head_outputs``), compared cell by cell / anchor by anchor.

Rules (student head task x loss x teacher), each returning the arguments of the loss module:

==========  ==============  ===========================================================================
task        loss            pairing
==========  ==============  ===========================================================================
instance    mask_distill    masks: every detection box of the view whose prompt mask exists (matched by
                            image and ``label_index``) -> the student mask of the anchor matched to that
                            box (``head.instance_mask_logits``, (N, S/4, S/4)) vs the teacher mask on
                            the same grid; weight = cells inside the box (centre rule, plus the cell
                            holding the box centre) and inside the teacher's valid region.
                            vfmkd: the same boxes through the same head rule on the teacher's output.
semantic    mask_distill    masks: per (image, class present in the prompts), the class's union (max) of
binary                      its masks, each confined to its own box (:data:`BACKGROUND_LOGIT` outside),
                            vs the student logit channel of that class (semantic: the class's semantic
                            index; binary: channel 0, classes in ``data.binary_classes`` only); weight =
                            the union of that class's boxes within the valid region.
                            vfmkd: every channel, per pixel, over the image content.
binary      kl_divergence   masks: per pixel of the valid image, Bernoulli KL at T (x T^2) between the
                            student logit and the teacher's foreground union (background = the floor
                            :data:`BACKGROUND_LOGIT` where no foreground box is), as 2-class softmax rows
                            ``[0, logit]`` (softmax of those is exactly the sigmoid). vfmkd: the
                            teacher's binary logits.
semantic    kl_divergence   vfmkd: per pixel softmax KL over the classes, over the image content.
semantic    cls_distill     masks: image-level class scores: per (image, thing class) the max over the
binary                      image of the student logit vs the max of the teacher's union inside the
                            class's boxes (the floor when the image has no box of the class); classes
                            without a detection class (stuff, unlabeled) are not distilled.
                            vfmkd: per-pixel class scores (ultralytics' layout (B, K, H*W)).
detection   cls_distill     vfmkd: per anchor class scores (B, nc, A) vs the teacher head's ``scores``
instance    kl_divergence   (same anchors: the teacher sees the student canvas); kl: softmax per anchor.
==========  ==============  ===========================================================================

Everything else is refused when the losses are built (:func:`resolve_output_term`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vfmkd.core.errors import ConfigError
from vfmkd.datasets.records import Batch
from vfmkd.distillation.geometry import resample_to_student
from vfmkd.distillation.targets import MaskLogits, TeacherTargets

#: The logit of "surely background" where a mask teacher says nothing (no prompt box there): outside a
#: mask's own box, and everywhere for a class absent from an image. sigmoid(-12) = 6e-6; softened by
#: T = 4 it is sigmoid(-3) = 0.047, about what SAM's own logits give far from the object.
BACKGROUND_LOGIT = -12.0

#: The output losses and the student head tasks a mask teacher / a vfmkd teacher serves for each.
MASK_RULES: Dict[str, Tuple[str, ...]] = {
    "mask_distill": ("instance", "semantic", "binary"),
    "kl_divergence": ("binary",),
    "cls_distill": ("semantic", "binary"),
}
HEAD_RULES: Dict[str, Tuple[str, ...]] = {
    "mask_distill": ("instance", "semantic", "binary"),
    "kl_divergence": ("detection", "instance", "semantic", "binary"),
    "cls_distill": ("detection", "instance", "semantic", "binary"),
}
#: Which teacher head task can teach a student head task.
TEACHER_TASKS: Dict[str, Tuple[str, ...]] = {
    "detection": ("detection", "instance"),  # an instance head's scores are detection scores
    "instance": ("instance",),
    "semantic": ("semantic",),
    "binary": ("binary",),
}
MASK_TEACHER_TYPES = ("sam", "lora_sam", "sam2")


@dataclass(frozen=True)
class TeacherOutputs:
    """What one teacher can give output distillation, known when the losses are built.

    ``can_segment``: box-prompted mask logits (SAM family). ``heads``: a vfmkd teacher's heads,
    name -> (task, num_classes)."""

    name: str
    type: str
    can_segment: bool = False
    heads: Mapping[str, Tuple[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputRule:
    """How one output term pairs: ``source`` "masks" (teacher mask logits) or "heads" (the vfmkd
    teacher's ``teacher_head``)."""

    loss: str
    task: str
    source: str
    teacher_head: str = ""


def segmenting_teachers_hint(teachers: Mapping[str, TeacherOutputs], task: str) -> str:
    """'types sam, lora_sam, sam2 or a vfmkd teacher with a <task> head' plus which of this run's
    teachers qualify."""
    mine = [t.name for t in teachers.values()
            if t.can_segment or any(k in TEACHER_TASKS[task] for k, _ in t.heads.values())]
    here = f" (in this run: {', '.join(sorted(mine))})" if mine else " (none in this run)"
    article = "an" if task[0] in "aeiou" else "a"
    return f"teachers of type {', '.join(MASK_TEACHER_TYPES)} or a vfmkd teacher with {article} {task} head{here}"


def resolve_output_term(loss: str, where: str, head: str, task: str, num_classes: int,
                        teacher: TeacherOutputs, teachers: Mapping[str, TeacherOutputs],
                        teacher_head: Optional[str] = None) -> OutputRule:
    """The pairing of output loss ``loss`` on student head ``head`` (``task``, ``num_classes``) with
    ``teacher``, or a :class:`ConfigError` saying which teachers could serve it.

    A vfmkd teacher's head serves when its task fits (:data:`TEACHER_TASKS`) and it has the student
    head's number of classes; ``teacher_head`` picks one by name (default: the head of the student
    head's name if it fits, else the only fitting one)."""
    fitting = {n: (t, k) for n, (t, k) in teacher.heads.items() if t in TEACHER_TASKS[task]}
    if teacher_head is not None:
        if teacher_head not in teacher.heads:
            raise ConfigError(f"{where}: teacher '{teacher.name}' has heads {sorted(teacher.heads)}, not '{teacher_head}'")
        if teacher_head not in fitting:
            raise ConfigError(f"{where}: teacher head '{teacher_head}' is a {teacher.heads[teacher_head][0]} head; the "
                              f"student head '{head}' ({task}) needs one of task {'/'.join(TEACHER_TASKS[task])}")
        fitting = {teacher_head: fitting[teacher_head]}
    if fitting and task in HEAD_RULES[loss]:
        name = head if head in fitting else (next(iter(fitting)) if len(fitting) == 1 else None)
        if name is None:
            raise ConfigError(f"{where}: teacher '{teacher.name}' has several {task} heads {sorted(fitting)}; "
                              f"name one with teacher_head: <name>")
        classes = fitting[name][1]
        if classes != num_classes:
            raise ConfigError(f"{where}: teacher '{teacher.name}' head '{name}' predicts {classes} classes, the student "
                              f"head '{head}' {num_classes}; output distillation needs the same classes (train the "
                              f"teacher on the student's dataset, or use a feature loss)")
        return OutputRule(loss, task, "heads", name)
    if teacher.can_segment and task in MASK_RULES[loss]:
        return OutputRule(loss, task, "masks")
    if loss == "cls_distill" and (teacher.can_segment or task in ("detection", "instance")):
        raise ConfigError(
            f"{where}: cls_distill on the {task} head '{head}' needs a teacher that provides class scores: a vfmkd "
            f"teacher (type: vfmkd, a trained vfmkd checkpoint) with a {task} head of the same {num_classes} classes; "
            f"teacher '{teacher.name}' ({teacher.type}) provides none"
            + (" (box-prompted masks are class-agnostic; its image-level class scores serve semantic and binary "
               "heads only)" if teacher.can_segment else ""))
    if loss == "kl_divergence" and teacher.can_segment:
        raise ConfigError(
            f"{where}: kl_divergence on the {task} head '{head}' needs the teacher's "
            f"{'per-pixel class' if task == 'semantic' else 'class'} distribution: a vfmkd teacher with a {task} head of the same classes. Teacher '{teacher.name}' "
            f"({teacher.type}) gives class-agnostic box masks: use mask_distill (all mask-capable heads) or "
            f"kl_divergence on a binary head")
    if task not in (MASK_RULES[loss] + HEAD_RULES[loss]):
        raise ConfigError(f"{where}: {loss} does not apply to a {task} head ('{head}')")
    if task in MASK_RULES[loss]:
        raise ConfigError(
            f"{where}: {loss} on the {task} head '{head}' needs a teacher that can segment (box-prompted mask logits) or "
            f"predicts {task} outputs, and teacher '{teacher.name}' ({teacher.type}) cannot. Teachers that can: "
            f"{segmenting_teachers_hint(teachers, task)}; set 'teacher:' to one of them.")
    raise ConfigError(
        f"{where}: {loss} on the {task} head '{head}' needs a vfmkd teacher (type: vfmkd) with a {task} head of the same "
        f"{num_classes} classes; teacher '{teacher.name}' ({teacher.type}) has none.")


# ---------------------------------------------------------------------------------------- geometry
def cell_centres(grid_hw: Tuple[int, int], stride: float, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ys (H,), xs (W,)) canvas-pixel centres of the cells of a grid of ``stride``."""
    h, w = grid_hw
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    return ys, xs


def centre_cells(boxes_xyxy: torch.Tensor, grid_hw: Tuple[int, int], stride: float) -> torch.Tensor:
    """(N, H, W) bool: cells whose centre lies in ``[x1, x2) x [y1, y2)`` (canvas pixels)."""
    ys, xs = cell_centres(grid_hw, stride, boxes_xyxy.device)
    b = boxes_xyxy.float()
    in_x = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])  # (N, W)
    in_y = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])  # (N, H)
    return in_y[:, :, None] & in_x[:, None, :]


def box_cells(boxes_xyxy: torch.Tensor, grid_hw: Tuple[int, int], stride: float) -> torch.Tensor:
    """(N, H, W) bool: :func:`centre_cells` plus the cell holding the box centre, so a box smaller
    than a cell still has one cell."""
    inside = centre_cells(boxes_xyxy, grid_hw, stride)
    n = boxes_xyxy.shape[0]
    if n:
        h, w = grid_hw
        b = boxes_xyxy.float()
        cx = ((b[:, 0] + b[:, 2]) / 2 / stride).floor().long().clamp(0, w - 1)
        cy = ((b[:, 1] + b[:, 3]) / 2 / stride).floor().long().clamp(0, h - 1)
        inside[torch.arange(n, device=b.device), cy, cx] = True
    return inside


def content_cells(batch: Batch, grid_hw: Tuple[int, int], stride: float, device: torch.device) -> torch.Tensor:
    """(B, H, W) bool: cells whose centre lies in the view's content box (image, not padding)."""
    return centre_cells(batch.views.content_box.to(device=device, dtype=torch.float32), grid_hw, stride)


def student_affine_of(target: TeacherTargets, batch: Batch) -> torch.Tensor:
    """Reference frame -> student canvas: the identity of a live pass, the views' affines for cached targets."""
    return target.student_affine if target.student_affine is not None else batch.views.affine


def masks_on_grid(logits: torch.Tensor, batch_idx: torch.Tensor, target: TeacherTargets, student_affine: torch.Tensor,
                  grid_hw: Tuple[int, int], stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher mask logits (N, h, w) on the teacher canvas (image ``batch_idx[n]``) -> (N, H, W) on
    the student grid of ``stride`` and the (N, H, W) float validity (cell centre in the teacher's
    unpadded region), through the geometry used for features."""
    n = logits.shape[0]
    device = logits.device
    if n == 0:
        empty = torch.zeros((0, *grid_hw), device=device)
        return empty, empty
    idx = batch_idx.long().to(target.affine.device)
    sampled, valid = resample_to_student(
        logits.float().unsqueeze(1), target.affine[idx], target.valid_hw[idx], (target.input_size, target.input_size),
        student_affine.to(target.affine.device)[idx], grid_hw, stride)
    return sampled[:, 0], valid[:, 0]


def image_valid_on_grid(target: TeacherTargets, student_affine: torch.Tensor, grid_hw: Tuple[int, int],
                        stride: int) -> torch.Tensor:
    """(B, H, W) float: student cells whose centre lies in the teacher's valid region."""
    b = target.affine.shape[0]
    probe = torch.zeros(b, 1, 1, 1, device=target.affine.device)  # one cell covering the canvas: only the mask matters
    _, valid = resample_to_student(probe, target.affine, target.valid_hw, (target.input_size, target.input_size),
                                   student_affine.to(target.affine.device), grid_hw, stride)
    return valid[:, 0]


def match_rows(batch_a: torch.Tensor, label_a: torch.Tensor, batch_b: torch.Tensor,
               label_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(ia, ib)`` of the rows of A and B with the same (image, label_index), label >= 0
    (the first B row of a repeated key); in A's order."""
    first: Dict[Tuple[int, int], int] = {}
    for j, key in enumerate(zip(batch_b.long().tolist(), label_b.long().tolist())):
        if key[1] >= 0:
            first.setdefault(key, j)
    ia, ib = [], []
    for i, key in enumerate(zip(batch_a.long().tolist(), label_a.long().tolist())):
        j = first.get(key)
        if key[1] >= 0 and j is not None:
            ia.append(i)
            ib.append(j)
    return torch.tensor(ia, dtype=torch.long), torch.tensor(ib, dtype=torch.long)


def class_union(logits: torch.Tensor, inside: torch.Tensor, group: torch.Tensor,
                num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Union of masks by group: each mask (N, H, W) is confined to its box (``inside``, else
    :data:`BACKGROUND_LOGIT`), then the groups take the per-cell max -> (G, H, W) logits and the
    (G, H, W) bool union of the member boxes. A group without members stays background."""
    h, w = logits.shape[-2:]
    confined = torch.where(inside, logits, torch.full_like(logits, BACKGROUND_LOGIT)).reshape(len(logits), -1)
    index = group.long().view(-1, 1).expand(-1, h * w)
    union = torch.full((num_groups, h * w), BACKGROUND_LOGIT, device=logits.device, dtype=confined.dtype)
    union = union.scatter_reduce(0, index, confined, reduce="amax", include_self=True)
    boxes = torch.zeros((num_groups, h * w), device=logits.device, dtype=confined.dtype)
    boxes = boxes.scatter_reduce(0, index, inside.reshape(len(logits), -1).to(confined.dtype), reduce="amax", include_self=True)
    return union.view(num_groups, h, w), boxes.view(num_groups, h, w) > 0


def canvas_boxes_xyxy(bboxes_cxcywh: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised cx, cy, w, h -> canvas pixels x1, y1, x2, y2."""
    b = bboxes_cxcywh.float() * size
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], dim=1)


# ---------------------------------------------------------------------------------------- pairing
@dataclass
class MaskPrompts:
    """The teacher masks of a batch that pair with detection boxes of the view: ``rows`` index
    ``batch.boxes``, ``logits`` (M, H, W) on the student grid, ``valid`` (M, H, W), ``boxes``
    (M, 4) canvas xyxy, ``cls`` (M,) detection class, ``batch_idx`` (M,)."""

    rows: torch.Tensor
    logits: torch.Tensor
    valid: torch.Tensor
    boxes: torch.Tensor
    cls: torch.Tensor
    batch_idx: torch.Tensor


def teacher_mask_logits(target: TeacherTargets, device: torch.device) -> Optional[MaskLogits]:
    """The targets' :class:`MaskLogits` as float32 on ``device``, or None when absent."""
    return None if target.mask_logits is None else target.mask_logits.to_float(device)


def prompts_on_grid(batch: Batch, target: TeacherTargets, grid_hw: Tuple[int, int], stride: int,
                    device: torch.device) -> Optional[MaskPrompts]:
    """Pair each detection box of the view with its teacher mask (same image and ``label_index``)
    and carry the masks onto the student grid; None when the teacher has no masks this step."""
    record = teacher_mask_logits(target, device)
    if record is None:
        return None
    logits = record.logits
    det = batch.boxes
    ia, ib = match_rows(det.batch_idx.cpu(), det.label_index.cpu(), record.batch_idx.cpu(), record.label_index.cpu())
    ia, ib = ia.to(device), ib.to(device)
    size = batch.images.shape[-1]
    grid_logits, valid = masks_on_grid(logits[ib], record.batch_idx.to(device)[ib], target, student_affine_of(target, batch),
                                       grid_hw, stride)
    return MaskPrompts(rows=ia, logits=grid_logits.to(device), valid=valid.to(device),
                       boxes=canvas_boxes_xyxy(det.bboxes.to(device)[ia], size),
                       cls=det.cls.to(device).view(-1)[ia].long(), batch_idx=det.batch_idx.to(device)[ia].long())


def instance_mask_pair(head: Any, output: Any, batch: Batch, target: TeacherTargets
                       ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """mask_distill on an instance head with a mask teacher -> (student (1, M, h, w), teacher
    (1, M, h, w), weight (1, M, h, w)) on the prototype grid, or None when nothing pairs."""
    proto = head.raw(output)["proto"]
    grid_hw = tuple(proto.shape[-2:])
    stride = batch.images.shape[-1] // grid_hw[1]
    prompts = prompts_on_grid(batch, target, grid_hw, stride, proto.device)
    if prompts is None or len(prompts.rows) == 0:
        return None
    student = head.instance_mask_logits(output, prompts.boxes, prompts.cls, prompts.batch_idx)
    weight = box_cells(prompts.boxes, grid_hw, stride).float() * prompts.valid
    return student[None], prompts.logits[None], weight[None]


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
        raise ValueError(f"the teacher's instance masks {tuple(teacher.shape)} and the student's {tuple(student.shape)} "
                         f"differ: the vfmkd teacher must run at the student's img_size")
    weight = box_cells(boxes, grid_hw, size // grid_hw[1]).float()
    return student[None], teacher[None], weight[None]


def class_channels(cls: torch.Tensor, channel_of_class: torch.Tensor) -> torch.Tensor:
    """Detection class ids (M,) -> the student's logit channel (M,) (-1: the class has none)."""
    table = channel_of_class.to(cls.device)
    ok = (cls >= 0) & (cls < len(table))
    out = torch.full_like(cls, -1)
    out[ok] = table[cls[ok]]
    return out


def class_union_pairs(logits: torch.Tensor, batch: Batch, target: TeacherTargets, channel_of_class: torch.Tensor
                      ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per (image, channel) present in the prompts: (student (G, H, W) logits of that channel,
    teacher union (G, H, W), box union (G, H, W) bool, valid (G, H, W) float, keys (G, 2) =
    (image, channel)); None when the teacher has no masks or no prompt maps to a channel."""
    grid_hw = tuple(logits.shape[-2:])
    stride = batch.images.shape[-1] // grid_hw[1]
    prompts = prompts_on_grid(batch, target, grid_hw, stride, logits.device)
    if prompts is None:
        return None
    channel = class_channels(prompts.cls, channel_of_class)
    keep = channel >= 0
    if not bool(keep.any()):
        return None
    num_ch = logits.shape[1]
    key = prompts.batch_idx[keep] * num_ch + channel[keep]
    groups, group_of = torch.unique(key, return_inverse=True)
    inside = box_cells(prompts.boxes[keep], grid_hw, stride)
    union, boxes = class_union(prompts.logits[keep], inside, group_of, len(groups))
    valid = torch.zeros(len(groups), *grid_hw, device=logits.device).scatter_reduce(
        0, group_of.view(-1, 1, 1).expand(-1, *grid_hw), prompts.valid[keep], reduce="amax", include_self=True)
    img, ch = groups // num_ch, groups % num_ch
    return logits[img, ch], union, boxes, valid, torch.stack([img, ch], 1)


def class_mask_pair(logits: torch.Tensor, batch: Batch, target: TeacherTargets, channel_of_class: torch.Tensor
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """mask_distill on a semantic/binary head with a mask teacher -> (student (1, G, H, W), teacher
    union (1, G, H, W), weight (1, G, H, W) = union of the class's boxes x valid)."""
    found = class_union_pairs(logits, batch, target, channel_of_class)
    if found is None:
        return None
    student, union, boxes, valid, _ = found
    return student[None], union[None], (boxes.float() * valid)[None]


def as_two_class(logits: torch.Tensor) -> torch.Tensor:
    """(...,) foreground logits -> (..., 2) rows ``[0, logit]``: softmax over them is (1 - p, p)
    with p = sigmoid(logit), so a 2-class KL is exactly the Bernoulli KL."""
    return torch.stack([torch.zeros_like(logits), logits], dim=-1)


def binary_kl_pair(logits: torch.Tensor, batch: Batch, target: TeacherTargets, channel_of_class: torch.Tensor
                   ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """kl_divergence on a binary head with a mask teacher -> (student (P, 2), teacher (P, 2),
    weight (P,)) over every cell of every image (P = B*H*W): the teacher is the union of the
    foreground classes' masks (each within its box), :data:`BACKGROUND_LOGIT` elsewhere; weight =
    the teacher's valid region. None when the teacher has no masks this step."""
    if target.mask_logits is None:
        return None
    b, _, h, w = logits.shape
    stride = batch.images.shape[-1] // w
    teacher = torch.full((b, h, w), BACKGROUND_LOGIT, device=logits.device)
    found = class_union_pairs(logits, batch, target, channel_of_class)
    if found is not None:
        _, union, _, _, keys = found
        teacher[keys[:, 0]] = union  # binary: one group (channel 0) per image
    valid = image_valid_on_grid(target, student_affine_of(target, batch), (h, w), stride).to(logits.device)
    return as_two_class(logits[:, 0].reshape(-1)), as_two_class(teacher.reshape(-1)), valid.reshape(-1)


def image_class_pair(logits: torch.Tensor, batch: Batch, target: TeacherTargets, channel_of_class: torch.Tensor,
                     mode: str) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """cls_distill on a semantic/binary head with a mask teacher: image-level scores of the thing
    channels (those some detection class maps to). Student: max over the image content of the
    channel's logits; teacher: max of the class's union inside its boxes, :data:`BACKGROUND_LOGIT`
    when the image has no box of the class. ``sigmoid`` mode -> ((N, 1), (N, 1), None) rows per
    (image, thing channel); ``softmax`` -> ((B, K_thing), (B, K_thing), None)."""
    if target.mask_logits is None:
        return None
    b, k, h, w = logits.shape
    stride = batch.images.shape[-1] // w
    things = torch.unique(channel_of_class[channel_of_class >= 0]).to(logits.device)
    if len(things) == 0:
        return None
    inside = content_cells(batch, (h, w), stride, logits.device)  # (B, H, W)
    pooled = logits.masked_fill(~inside[:, None], float("-inf")).amax(dim=(2, 3))  # (B, K)
    teacher = torch.full((b, k), BACKGROUND_LOGIT, device=logits.device)
    found = class_union_pairs(logits, batch, target, channel_of_class)
    if found is not None:
        _, union, boxes, valid, keys = found
        score = union.masked_fill(~(boxes & (valid > 0)), BACKGROUND_LOGIT).amax(dim=(1, 2))
        teacher[keys[:, 0], keys[:, 1]] = score
    student, teacher = pooled[:, things], teacher[:, things]
    if mode == "softmax":
        return student, teacher, None
    return student.reshape(-1, 1), teacher.reshape(-1, 1), None


def scores_of(output: Any) -> torch.Tensor:
    """(B, nc, A) class logits of a detection/instance head's raw (training) or eval output."""
    raw = output if isinstance(output, dict) else output[1]
    return raw["scores"]


def check_same(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; a vfmkd teacher "
                         f"must see the student's canvas (its img_size equal to data.img_size, the same head strides)")


def dense_pair(student: torch.Tensor, teacher: torch.Tensor, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def mask_pair(rule: OutputRule, head: Any, output: Any, batch: Batch, target: TeacherTargets,
              channel_of_class: Optional[torch.Tensor], mode: str = "sigmoid") -> Optional[Tuple[tuple, dict]]:
    """Loss arguments ``(args, kwargs)`` of a rule with source "masks" (a SAM-family teacher)."""
    if rule.task == "instance":
        pair = instance_mask_pair(head, output, batch, target)
        return None if pair is None else (pair, {})
    assert channel_of_class is not None, "semantic/binary mask pairing needs the class -> channel table"
    if rule.loss == "mask_distill":
        pair = class_mask_pair(output, batch, target, channel_of_class)
    elif rule.loss == "kl_divergence":
        pair = binary_kl_pair(output, batch, target, channel_of_class)
    else:
        found = image_class_pair(output, batch, target, channel_of_class, mode)
        return None if found is None else ((found[0], found[1]), {})
    return None if pair is None else (pair, {})


class OutputPairing:
    """One output term's pairing, resolved at build time: ``rule``, the student ``head`` module (a
    plain reference: the model owns it), and for semantic/binary heads with a mask teacher
    ``channel_of_class`` (C_det,) int64: detection class id -> the head's logit channel (-1: none).
    ``pair(output, batch, target)`` -> the loss's ``(args, kwargs)``, or None when the teacher's
    targets hold nothing to pair this step."""

    def __init__(self, rule: OutputRule, head: Any, channel_of_class: Optional[Sequence[int]] = None,
                 mode: str = "sigmoid") -> None:
        self.rule, self.head, self.mode = rule, head, mode
        self.channel_of_class = None if channel_of_class is None else torch.as_tensor(list(channel_of_class), dtype=torch.long)
        if rule.source == "masks" and rule.task in ("semantic", "binary") and self.channel_of_class is None:
            raise ConfigError(f"{rule.loss} on a {rule.task} head from teacher masks needs the detection class -> "
                              f"{rule.task} channel table")

    @property
    def needs_masks(self) -> bool:
        return self.rule.source == "masks"

    def pair(self, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
        if self.rule.source == "heads":
            return head_pair(self.rule, self.head, output, batch, target, self.mode)
        return mask_pair(self.rule, self.head, output, batch, target, self.channel_of_class, self.mode)


def check_mask_sources(distiller: Any, router: Any) -> None:
    """Every teacher whose mask logits an output term reads (``distiller.teachers_needing_masks()``)
    must have them in its cache when it has one (``router.sources[name].cache``); a cache written with
    ``--outputs features`` only (or not finished) is a :class:`ConfigError` naming the command that
    adds them (it reopens the file and fills the masks, resumably)."""
    for name in distiller.teachers_needing_masks():
        src = router.sources.get(name)
        cache = None if src is None else src.cache
        if cache is None or cache.reader.has_masks:
            continue
        terms = sorted(n for n, t in distiller.output_terms(active_only=False).items() if t.teacher == name
                       and getattr(t.pairing, "needs_masks", False))
        raise ConfigError(
            f"teachers.{name}: distillation.losses {', '.join(terms)} distil its box-prompted mask logits, but its cache "
            f"{cache.path} holds no mask logits (written with --outputs features, or the masks are unfinished). "
            f"Add them (the tool reopens the file and fills the masks, resumably):\n  {cache.reader.rebuild_command(masks=True)}")
