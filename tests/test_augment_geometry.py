"""Augmented student views and the geometry that carries cached maps onto them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vfmkd.datasets import GeometricAugment, student_view, transform_boxes
from vfmkd.distillation.geometry import MirroredViewError, resample_to_student


def _image(coco128):
    path = sorted((coco128 / "images" / "train2017").glob("*.jpg"))[3]
    return np.asarray(Image.open(path).convert("RGB"))


def test_flip_view_moves_pixels_and_boxes_together(coco128):
    img = _image(coco128)
    h, w = img.shape[:2]
    view = student_view(img, 320, GeometricAugment(fliplr=1.0), np.random.default_rng(0))
    assert view.flipped and view.affine is not None and view.affine[0] < 0
    sx, sy, ox, oy = view.affine
    # the pixel at original (x, y) is found at (x * sx + ox, y * sy + oy) on the canvas
    x, y = w * 0.3, h * 0.6
    cx, cy = int(x * sx + ox), int(y * sy + oy)
    r = abs(sx)
    patch = view.canvas[cy - 1:cy + 2, cx - 1:cx + 2].mean((0, 1))
    src = img[int(y) - int(2 / r):int(y) + int(2 / r) + 1, int(x) - int(2 / r):int(x) + int(2 / r) + 1].mean((0, 1))
    assert np.abs(patch - src).max() < 40
    labels = np.array([[1, 0.25, 0.5, 0.1, 0.2]], dtype=np.float32)
    out = transform_boxes(labels, w, h, view, 320)
    assert out[0, 1] == pytest.approx((0.25 * w * sx + ox) / 320, abs=1e-4)  # mirrored centre
    assert out[0, 3] == pytest.approx(0.1 * w * r / 320, abs=1e-4)


def test_rotation_has_no_axis_aligned_affine_and_crops_drop_boxes(coco128):
    img = _image(coco128)
    rot = student_view(img, 320, GeometricAugment(degrees=30), np.random.default_rng(1))
    assert rot.rotated
    shifted = student_view(img, 320, GeometricAugment(translate=0.5, scale=0.5), np.random.default_rng(3))
    assert not shifted.rotated
    labels = np.array([[0, 0.02, 0.02, 0.02, 0.02], [0, 0.5, 0.5, 0.4, 0.4]], dtype=np.float32)
    kept = transform_boxes(labels, img.shape[1], img.shape[0], shifted, 320)
    assert len(kept) <= 2 and ((kept[:, 1:] >= 0) & (kept[:, 1:] <= 1)).all()


def _coords(canvas: int, stride: int) -> torch.Tensor:
    n = canvas // stride
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * stride
    return torch.stack((c[None, :].expand(n, n), c[:, None].expand(n, n)))[None]


def test_flipped_cache_pass_is_used_for_a_flipped_student_view():
    w0 = h0 = 200.0
    t_size, s_size, stride = 128, 160, 16
    ts = t_size / w0
    # flipped teacher pass: original x -> teacher x = -ts * x + ts * w0
    t_flip = torch.tensor([[-ts, ts, ts * w0, 0.0]])
    s_flip = torch.tensor([[-0.8, 0.8, 160.0, 0.0]])  # mirrored student letterbox
    valid = torch.tensor([[h0 * ts, w0 * ts]])
    grid = s_size // stride
    out, mask = resample_to_student(_coords(t_size, 16), t_flip, valid, (t_size, t_size), s_flip, (grid, grid), stride)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * stride
    x_orig = (centres - 160.0) / -0.8
    expected_x = -ts * x_orig + ts * w0
    inner = (expected_x > 8) & (expected_x < t_size - 8)
    torch.testing.assert_close(out[0, 0, 4][inner], expected_x[inner], atol=1e-3, rtol=0)
    assert mask.bool().all()
    plain = torch.tensor([[ts, ts, 0.0, 0.0]])
    with pytest.raises(MirroredViewError):
        resample_to_student(_coords(t_size, 16), plain, valid, (t_size, t_size), s_flip, (grid, grid), stride)
