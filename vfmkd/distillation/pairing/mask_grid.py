"""Teacher mask logits on the student grid, for output distillation from a mask teacher: the cells of
a grid (centres, boxes, image content), the teacher masks carried onto a student head's grid by the
feature geometry, each detection box of the view matched to its teacher mask (:func:`prompts_on_grid`)
and the per-class union of masks (:func:`class_union`, :data:`BACKGROUND_LOGIT` where no box is)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from vfmkd.datasets.records import Batch
from vfmkd.distillation.geometry import resample_to_student
from vfmkd.distillation.targets import MaskLogits, TeacherTargets

#: The logit of "surely background" where a mask teacher says nothing (no prompt box there): outside a
#: mask's own box, and everywhere for a class absent from an image. sigmoid(-12) = 6e-6; softened by
#: T = 4 it is sigmoid(-3) = 0.047, about what SAM's own logits give far from the object.
BACKGROUND_LOGIT = -12.0


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
    boxes = boxes.scatter_reduce(0, index, inside.reshape(len(logits), -1).to(confined.dtype), reduce="amax",
                                 include_self=True)
    return union.view(num_groups, h, w), boxes.view(num_groups, h, w) > 0


def canvas_boxes_xyxy(bboxes_cxcywh: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised cx, cy, w, h -> canvas pixels x1, y1, x2, y2."""
    b = bboxes_cxcywh.float() * size
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], dim=1)


# ---------------------------------------------------------------------------------------- prompts
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
    grid_logits, valid = masks_on_grid(logits[ib], record.batch_idx.to(device)[ib], target,
                                       student_affine_of(target, batch),
                                       grid_hw, stride)
    return MaskPrompts(rows=ia, logits=grid_logits.to(device), valid=valid.to(device),
                       boxes=canvas_boxes_xyxy(det.bboxes.to(device)[ia], size),
                       cls=det.cls.to(device).view(-1)[ia].long(), batch_idx=det.batch_idx.to(device)[ia].long())

