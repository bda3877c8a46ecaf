"""Teacher-to-student resampling maps the same image points onto each other."""
from __future__ import annotations

import torch
from PIL import Image

from vfmkd.distillation.geometry import resample_to_student


def _coordinate_map(canvas: int, stride: int) -> torch.Tensor:
    """A teacher 'feature map' whose two channels hold the teacher-pixel x and y of each cell centre."""
    n = canvas // stride
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * stride
    return torch.stack((c[None, :].expand(n, n), c[:, None].expand(n, n)))[None]


def test_student_cells_sample_the_teacher_at_the_same_image_point(coco128):
    path = sorted((coco128 / "images" / "train2017").glob("*.jpg"))[0]
    w0, h0 = Image.open(path).size
    # SAM view: longest side to 256, bottom-right padding.
    t_size, t_stride = 256, 16
    ts = t_size / max(w0, h0)
    t_aff = torch.tensor([[ts, ts, 0.0, 0.0]])
    t_valid = torch.tensor([[h0 * ts, w0 * ts]])
    # YOLO view: letterbox to 320 with centred padding.
    s_size, s_stride = 320, 16
    r = s_size / max(w0, h0)
    nw, nh = round(w0 * r), round(h0 * r)
    s_aff = torch.tensor([[nw / w0, nh / h0, (s_size - nw) / 2, (s_size - nh) / 2]])
    grid = s_size // s_stride
    sampled, mask = resample_to_student(
        _coordinate_map(t_size, t_stride), t_aff, t_valid, (t_size, t_size), s_aff, (grid, grid), s_stride
    )
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * s_stride
    exp_x = (centres - s_aff[0, 2]) / s_aff[0, 0] * ts
    exp_y = (centres - s_aff[0, 3]) / s_aff[0, 1] * ts
    valid = mask[0, 0].bool()
    # Letterbox padding is masked out, the image area is kept.
    assert valid.any() and not valid.all()
    rows, cols = valid.any(1), valid.any(0)
    assert torch.equal(rows, (exp_y >= 0) & (exp_y < h0 * ts))
    assert torch.equal(cols, (exp_x >= 0) & (exp_x < w0 * ts))
    # Bilinear sampling of a linear map is exact away from the outermost half cell.
    inner_x = (exp_x > t_stride / 2) & (exp_x < t_size - t_stride / 2)
    inner_y = (exp_y > t_stride / 2) & (exp_y < t_size - t_stride / 2)
    sel = valid & inner_y[:, None] & inner_x[None, :]
    assert sel.sum() > 20
    torch.testing.assert_close(sampled[0, 0][sel], exp_x[None, :].expand(grid, grid)[sel], atol=1e-3, rtol=0)
    torch.testing.assert_close(sampled[0, 1][sel], exp_y[:, None].expand(grid, grid)[sel], atol=1e-3, rtol=0)


def test_identical_views_give_the_identity():
    t = torch.randn(2, 8, 10, 10)
    aff = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)
    valid = torch.tensor([[160.0, 160.0]] * 2)
    out, mask = resample_to_student(t, aff, valid, (160, 160), aff, (10, 10), 16)
    torch.testing.assert_close(out, t)
    assert mask.all()
