"""The feature picture: per distilled level the 3-component PCA of the teacher map next to the
adapted student map projected with the same components and scaled with the teacher's range
(:func:`pca_panel`, drawn on :mod:`vfmkd.engine.pictures.vis_canvas`'s layout)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from vfmkd.engine.pictures.vis_canvas import PanelCanvas, resize_map
from vfmkd.tasks.pictures import Maps, as_cpu_tensor


def pca_basis(teacher: Maps, valid: Optional[Maps] = None, k: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and the top-``k`` principal directions (C, k) of the teacher's valid cells.

    ``teacher`` (B, C, h, w); ``valid`` (B, h, w) bool (None: all cells). Exact eigendecomposition
    of the covariance in float64 (deterministic, unlike randomised ``pca_lowrank``); each
    direction's sign is fixed so its largest loading is positive. Fewer than ``k`` channels or
    cells: the missing directions are zero."""
    t = as_cpu_tensor(teacher).double()
    cells = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if valid is not None:
        cells = cells[as_cpu_tensor(valid).bool().reshape(-1)]
    c = t.shape[1]
    if cells.shape[0] == 0:
        return torch.zeros(c, dtype=torch.float64), torch.zeros(c, k, dtype=torch.float64)
    mean = cells.mean(0)
    x = cells - mean
    cov = x.T @ x / max(1, x.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = torch.zeros(c, k, dtype=torch.float64)
    top = vecs.flip(1)[:, : min(k, c, cells.shape[0])]
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    basis[:, : top.shape[1]] = top * torch.where(signs == 0, torch.ones_like(signs), signs)
    return mean, basis


def pca_project(teacher: Maps, student: Maps, valid: Optional[Maps] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Teacher and (adapted) student maps (B, C, h, w) with the same C -> RGB images (B, h, w, 3)
    in [0, 1]: both projected on the teacher's 3 principal directions (:func:`pca_basis`) and
    min-max scaled per component with the range of the teacher's valid cells (student values
    outside that range are clipped). Invalid cells are black in both. The student map is resized
    (bilinear) to the teacher's grid when its (h, w) differ."""
    t, s = as_cpu_tensor(teacher).double(), as_cpu_tensor(student).double()
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"the student map has {s.shape[1]} channels, the teacher map {t.shape[1]}: pass the "
                         "adapter output (teacher channels)")
    if s.shape[-2:] != t.shape[-2:]:
        s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    b, _, h, w = t.shape
    v = (torch.ones(b, h, w, dtype=torch.bool) if valid is None
         else resize_map(as_cpu_tensor(valid).bool(), (h, w), nearest=True).bool())
    mean, basis = pca_basis(t, v)
    pt = (t.permute(0, 2, 3, 1) - mean) @ basis  # (B, h, w, 3)
    ps = (s.permute(0, 2, 3, 1) - mean) @ basis
    inside = pt[v]
    lo, hi = (inside.min(0).values, inside.max(0).values) if len(inside) else (torch.zeros(3), torch.ones(3))
    span = torch.where(hi - lo > 1e-12, hi - lo, torch.ones_like(hi))

    def scale(p: torch.Tensor) -> np.ndarray:
        return (((p - lo) / span).clamp(0, 1) * v[..., None]).float().numpy()

    return scale(pt), scale(ps)


def pca_panel(path: Union[str, Path], teacher_maps: Mapping[str, Maps], student_maps: Mapping[str, Maps],
              images: Optional[Maps] = None, valid: Optional[Mapping[str, Maps]] = None,
              image_ids: Optional[Sequence[str]] = None, max_images: int = 4, title: str = "") -> Path:
    """One PNG: a row per shown image; per distilled level (key, e.g. ``sam/image_embeddings@P4``)
    two columns, the teacher map's 3-component PCA and the adapted student map under the same
    projection and scaling (:func:`pca_project`; the PCA is fitted on the teacher's valid cells of
    the shown images). ``images`` (B, 3, H, W), when given, adds an input column first. ``valid``
    per level (B, h, w) bool (cells holding image content; None: all). A level absent from
    ``student_maps`` reads "no student map". Written atomically; returns ``path``."""
    if not teacher_maps:
        raise ValueError("pca_panel needs at least one teacher map")
    levels = list(teacher_maps)
    n = min([int(max_images)] + [int(as_cpu_tensor(m).shape[0]) for m in teacher_maps.values()])
    cols: List[str] = (["input"] if images is not None else [])
    for lvl in levels:
        cols += [f"{lvl}\nteacher PCA", f"{lvl}\nstudent (same PCA)"]
    ids = list(image_ids) if image_ids is not None else [f"image {i}" for i in range(n)]
    canvas = PanelCanvas(n, len(cols), title, cols, ids[:n])
    first = 0
    if images is not None:
        imgs = as_cpu_tensor(images).float()
        for i in range(n):
            canvas.picture(i, 0, imgs[i].clamp(0, 1).permute(1, 2, 0).numpy())
        first = 1
    for li, lvl in enumerate(levels):
        t = as_cpu_tensor(teacher_maps[lvl])[:n]
        v = None if valid is None or lvl not in valid else as_cpu_tensor(valid[lvl])[:n]
        c = first + 2 * li
        if lvl not in student_maps:
            t_rgb, _ = pca_project(t, t, v)
            for i in range(n):
                canvas.picture(i, c, t_rgb[i])
                canvas.message(i, c + 1, "no student map")
            continue
        t_rgb, s_rgb = pca_project(t, as_cpu_tensor(student_maps[lvl])[:n], v)
        for i in range(n):
            canvas.picture(i, c, t_rgb[i])
            canvas.picture(i, c + 1, s_rgb[i])
    return canvas.save(path)

