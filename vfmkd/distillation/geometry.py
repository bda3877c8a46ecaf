"""Map a teacher's feature map onto a student's feature grid, image region to image region.

Teacher and student see the same original image under different resize/pad recipes (SAM: longest
side to 1024, padding bottom-right; YOLO: letterbox to 640, padding centred). Both are recorded as
per-axis affines ``(sx, sy, ox, oy)``: original pixel ``(x, y)`` sits at input pixel
``(x * sx + ox, y * sy + oy)``. For every student cell centre we go student input -> original ->
teacher input -> teacher feature coordinates and sample bilinearly; cells whose centre falls
outside the original image (the student's letterbox padding) are masked out of the loss.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def student_cell_centres(height: int, width: int, stride: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Input-pixel coordinates of the cell centres of a (height, width) grid: ys (H,), xs (W,)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    return ys, xs


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
        teacher_affine: (B, 4) original -> teacher input pixels.
        teacher_valid_hw: (B, 2) unpadded image size in teacher input pixels.
        teacher_canvas_hw: (H, W) of the teacher's padded input, in pixels.
        student_affine: (B, 4) original -> student input pixels.
        student_hw: (H_s, W_s) of the student feature map.
        student_stride: student input pixels per student cell.

    Returns:
        (B, C, H_s, W_s) resampled teacher features and a (B, 1, H_s, W_s) float mask that is 1
        where the student cell centre lies on the image in both views.
    """
    b = teacher_map.shape[0]
    device = teacher_map.device
    ys, xs = student_cell_centres(student_hw[0], student_hw[1], student_stride, device)
    s_aff = student_affine.to(device=device, dtype=torch.float32)
    t_aff = teacher_affine.to(device=device, dtype=torch.float32)
    # student input -> original image pixels, per image: (B, W_s) and (B, H_s)
    x_orig = (xs[None, :] - s_aff[:, 2:3]) / s_aff[:, 0:1]
    y_orig = (ys[None, :] - s_aff[:, 3:4]) / s_aff[:, 1:2]
    # original -> teacher input pixels
    x_t = x_orig * t_aff[:, 0:1] + t_aff[:, 2:3]
    y_t = y_orig * t_aff[:, 1:2] + t_aff[:, 3:4]
    valid_hw = teacher_valid_hw.to(device=device, dtype=torch.float32)
    x_ok = (x_t >= t_aff[:, 2:3]) & (x_t < t_aff[:, 2:3] + valid_hw[:, 1:2])
    y_ok = (y_t >= t_aff[:, 3:4]) & (y_t < t_aff[:, 3:4] + valid_hw[:, 0:1])
    # teacher input pixels -> grid_sample's [-1, 1] (align_corners=False: -1 is the left edge of
    # the first cell, +1 the right edge of the last one).
    gx = 2.0 * x_t / float(teacher_canvas_hw[1]) - 1.0
    gy = 2.0 * y_t / float(teacher_canvas_hw[0]) - 1.0
    grid = torch.stack(
        (gx[:, None, :].expand(b, student_hw[0], student_hw[1]), gy[:, :, None].expand(b, student_hw[0], student_hw[1])),
        dim=-1,
    )
    sampled = F.grid_sample(teacher_map.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = (y_ok[:, :, None] & x_ok[:, None, :]).unsqueeze(1).to(sampled.dtype)
    return sampled, mask

