"""Map a teacher's feature map onto a student's feature grid, image region to image region.

Teacher and student see the same picture under different recipes (SAM: long side to 1024, padding
bottom-right; YOLO: letterbox, maybe scaled, shifted or mirrored by augmentation). Both views are
recorded as per-axis affines ``(sx, sy, ox, oy)`` from a shared reference frame (the original image
for cached features, the student canvas for live teacher passes): reference pixel ``(x, y)`` sits
at input pixel ``(x * sx + ox, y * sy + oy)``; a mirrored view has ``sx < 0``.

Composing them gives, per axis, ``teacher = a * student + b``. The student's whole grid is one box
in teacher coordinates, so torchvision's RoIAlign carries the teacher map onto the student grid
(ReLabel's mechanism): each student cell averages the teacher map over the area it covers, with
enough samples to anti-alias when it covers several teacher cells. Cells whose centre falls
outside the teacher's valid (unpadded) region are masked out of the loss.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torchvision.ops import roi_align


class MirroredViewError(ValueError):
    """The student view is mirrored relative to the teacher's: a ViT map is not flip-equivariant,
    so it must come from a flipped teacher pass (cache ``--with-flip``) or a live teacher pass."""


def student_to_teacher(student_affine: torch.Tensor, teacher_affine: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image and axis, ``teacher_px = a * student_px + b``: returns ``a`` (B, 2) and ``b`` (B, 2) as (x, y)."""
    s = student_affine.to(torch.float64)
    t = teacher_affine.to(device=s.device, dtype=torch.float64)
    a = t[:, 0:2] / s[:, 0:2]
    b = t[:, 2:4] - a * s[:, 2:4]
    return a, b


def resample_to_student(
    teacher_map: torch.Tensor,
    teacher_affine: torch.Tensor,
    teacher_valid_hw: torch.Tensor,
    teacher_canvas_hw: Tuple[int, int],
    student_affine: torch.Tensor,
    student_hw: Tuple[int, int],
    student_stride: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Resample teacher features onto the student's grid.

    Args:
        teacher_map: (B, C, h_t, w_t) features covering the whole teacher canvas.
        teacher_affine: (B, 4) reference frame -> teacher input pixels.
        teacher_valid_hw: (B, 2) the unpadded region [0, h) x [0, w) of the teacher canvas.
        teacher_canvas_hw: (H, W) of the teacher's padded input, in pixels.
        student_affine: (B, 4) reference frame -> student input pixels.
        student_hw: (H_s, W_s) of the student feature map.
        student_stride: student input pixels per student cell.

    Returns:
        (B, C, H_s, W_s) teacher features on the student grid (float32) and a (B, 1, H_s, W_s)
        float mask, 1 where the student cell centre lies in the teacher's valid region.

    Raises:
        MirroredViewError: if a student view is mirrored relative to its teacher view.
    """
    b_sz = teacher_map.shape[0]
    device = teacher_map.device
    a, b = student_to_teacher(student_affine.to(device), teacher_affine)
    if (a <= 0).any():
        bad = sorted(set(torch.nonzero(a <= 0)[:, 0].tolist()))
        raise MirroredViewError(f"batch items {bad} see a mirrored view of their teacher map; use a flipped teacher "
                                "pass")
    h_s, w_s = student_hw
    span = torch.tensor([w_s * student_stride, h_s * student_stride], dtype=torch.float64, device=device)
    boxes = torch.cat(
        [torch.arange(b_sz, dtype=torch.float64, device=device)[:, None], b, a * span + b], dim=1
    ).to(torch.float32)
    h_t, w_t = teacher_map.shape[-2:]
    scale = w_t / float(teacher_canvas_hw[1])
    if abs(h_t / float(teacher_canvas_hw[0]) - scale) > 1e-6:
        raise ValueError(f"teacher map {h_t}x{w_t} does not cover a {teacher_canvas_hw} canvas with one stride")
    # aligned=True: box corners are continuous pixel coordinates, cell j spans [j, j + 1).
    sampled = roi_align(teacher_map.float(), boxes, (h_s, w_s), spatial_scale=scale, sampling_ratio=-1, aligned=True)
    centres_x = (torch.arange(w_s, device=device, dtype=torch.float64) + 0.5) * student_stride
    centres_y = (torch.arange(h_s, device=device, dtype=torch.float64) + 0.5) * student_stride
    x_t = a[:, 0:1] * centres_x[None] + b[:, 0:1]
    y_t = a[:, 1:2] * centres_y[None] + b[:, 1:2]
    valid = teacher_valid_hw.to(device=device, dtype=torch.float64)
    x_ok = (x_t >= 0) & (x_t < valid[:, 1:2])
    y_ok = (y_t >= 0) & (y_t < valid[:, 0:1])
    mask = (y_ok[:, :, None] & x_ok[:, None, :]).unsqueeze(1).to(sampled.dtype)
    return sampled, mask
