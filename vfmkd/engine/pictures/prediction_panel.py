"""Pictures of what teacher and student predict, per head: :func:`render_panel` draws one PNG of
:class:`~vfmkd.tasks.pictures.PanelRow` s (one head each, its columns :class:`~vfmkd.tasks.pictures.Prediction`
records that the head's task fills in) on :mod:`vfmkd.engine.pictures.vis_canvas`'s layout. Pure functions:
tensors in, one PNG out, nothing kept between calls.

- :func:`render_panel`: per shown image and per :class:`PanelRow` (one head), the columns
  :data:`PANEL_COLUMNS`: input, ground truth on the input, teacher, student, teacher on the input,
  student on the input, and the teacher-student difference map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import matplotlib
import numpy as np
import torch

from vfmkd.engine.pictures.vis_canvas import COLOURS, PanelCanvas, class_colour, resize_map
from vfmkd.tasks.pictures import (
    INSTANCE_MASKS,
    LABEL_MAP,
    PROBABILITY_MAP,
    Maps,
    PanelRow,
    Prediction,
    as_cpu_tensor,
)

PANEL_COLUMNS = ("input", "ground truth", "teacher", "student", "teacher on input", "student on input",
                 "|teacher - student|")
MAX_BOXES = 50  # boxes drawn per picture (highest scores first)
NO_TEACHER = "no teacher output"


# ------------------------------------------------------------------------------------ rendering
@dataclass
class _Drawn:
    """One prediction of one image, ready to draw: colour layer, its alpha, boxes, and the
    per-pixel map the difference column compares."""

    colour: np.ndarray  # (H, W, 3) float
    alpha: np.ndarray  # (H, W) float, how much of the colour covers the input in the overlay
    boxes: List[Tuple[np.ndarray, np.ndarray, str]]
    value: np.ndarray  # (H, W) or (K, H, W) float compared between teacher and student
    note: str = ""
    plain: Optional[np.ndarray] = None  # (H, W, 3) the prediction alone, when not its colours on black


def _box_list(boxes: Optional[torch.Tensor], cls: torch.Tensor, scores: Optional[torch.Tensor],
              names: Optional[Sequence[str]]) -> List[Tuple[np.ndarray, np.ndarray, str]]:
    if boxes is None or len(boxes) == 0:
        return []
    order = torch.argsort(scores.float(), descending=True) if scores is not None else torch.arange(len(boxes))
    out = []
    for j in order[:MAX_BOXES].tolist():
        k = int(cls[j])
        label = names[k] if names is not None and 0 <= k < len(names) else str(k)
        if scores is not None:
            label += f" {float(scores[j]):.2f}"
        out.append((boxes[j].float().numpy(), class_colour(k), label))
    return out


def _box_coverage(boxes: Optional[torch.Tensor], scores: Optional[torch.Tensor], hw: Tuple[int, int]) -> np.ndarray:
    """(H, W) the highest score of the boxes covering each pixel (1 without scores)."""
    cover = np.zeros(hw, np.float32)
    if boxes is None:
        return cover
    for j, (x1, y1, x2, y2) in enumerate(boxes.float().tolist()):
        s = 1.0 if scores is None else float(scores[j])
        ys = slice(max(0, int(math.floor(y1))), max(0, int(math.ceil(y2))))
        xs = slice(max(0, int(math.floor(x1))), max(0, int(math.ceil(x2))))
        cover[ys, xs] = np.maximum(cover[ys, xs], s)
    return cover


def _draw(pred: Prediction, i: int, hw: Tuple[int, int], names: Optional[Sequence[str]]) -> _Drawn:
    """Image ``i`` of ``pred`` on an (H, W) canvas."""
    if pred.kind == LABEL_MAP:
        lab = resize_map(pred.labels[i], hw, nearest=True).long().numpy()  # type: ignore[index]
        colour = COLOURS[np.clip(lab, 0, len(COLOURS) - 1) % len(COLOURS)] / 255.0
        alpha = (lab != 0).astype(np.float32) * 0.6
        if pred.ignore is not None:
            alpha[resize_map(pred.ignore[i], hw, nearest=True).numpy()] = 0.0
        value = (resize_map(pred.probs[i], hw, nearest=False).numpy() if pred.probs is not None
                 else lab[None].astype(np.float32))
        present = [k for k in np.unique(lab).tolist() if k != 0]
        return _Drawn(colour, alpha, [], value, note=f"classes: {len(present)}")
    if pred.kind == PROBABILITY_MAP:
        p = resize_map(pred.probs[i], hw, nearest=False).numpy()  # type: ignore[index]
        if pred.ignore is not None:
            ign = resize_map(pred.ignore[i], hw, nearest=True).numpy().astype(bool)
            p = np.where(ign, 0.0, p)
        colour = np.stack([np.ones_like(p), 0.15 * np.ones_like(p), 0.15 * np.ones_like(p)], -1)
        gray = np.repeat(p[..., None], 3, -1)
        return _Drawn(colour, 0.6 * p, [], p, note=f"fg {float((p > 0.5).mean()):.1%}", plain=gray)
    if pred.kind == INSTANCE_MASKS:
        masks = pred.masks[i]  # type: ignore[index]
        cls = pred.cls[i].view(-1)  # type: ignore[index]
        prob = (resize_map(masks.float(), hw, nearest=masks.dtype == torch.bool).numpy() if len(masks)
                else np.zeros((0, *hw), np.float32))
        colour, alpha = np.zeros((*hw, 3), np.float32), np.zeros(hw, np.float32)
        for j in range(len(prob)):  # later instances on top
            m = prob[j] > 0.5
            colour[m] = class_colour(int(cls[j]))
            alpha[m] = 0.55
        value = prob.max(0) if len(prob) else np.zeros(hw, np.float32)
        boxes = _box_list(pred.boxes[i] if pred.boxes is not None else None, cls,
                          pred.scores[i] if pred.scores is not None else None, names)
        return _Drawn(colour, alpha, boxes, value, note=f"instances: {len(prob)}")
    boxes_i = pred.boxes[i].view(-1, 4)  # type: ignore[index]
    scores = pred.scores[i] if pred.scores is not None else None
    return _Drawn(np.zeros((*hw, 3), np.float32), np.zeros(hw, np.float32),
                  _box_list(boxes_i, pred.cls[i].view(-1), scores, names),  # type: ignore[index]
                  _box_coverage(boxes_i, scores, hw), note=f"boxes: {len(boxes_i)}")


def _plain(d: _Drawn, dark: float = 0.12) -> np.ndarray:
    """The prediction alone: its colours on a dark background (binary: probability as grey)."""
    if d.plain is not None:
        return d.plain
    a = (d.alpha > 0)[..., None]
    return np.where(a, d.colour, dark)


def _overlay(img: np.ndarray, d: _Drawn) -> np.ndarray:
    a = d.alpha[..., None]
    return img * (1 - a) + d.colour * a


def difference_map(teacher: _Drawn, student: _Drawn, kind: str) -> np.ndarray:
    """(H, W) in [0, 1]: |teacher - student| per pixel. Binary: probability difference; instance:
    of the foreground (max over instance masks); boxes: of the box coverage; semantic: total
    variation 0.5 * sum_k |p_t - p_s| with probabilities on both sides, else label disagreement where
    the teacher's label map has a class (a teacher of box-prompted masks knows only the boxed classes)."""
    t, s = teacher.value, student.value
    if kind == LABEL_MAP:
        if t.shape[0] > 1 and t.shape == s.shape:
            return 0.5 * np.abs(t - s).sum(0)
        lt = t.argmax(0) if t.shape[0] > 1 else t[0]
        ls = s.argmax(0) if s.shape[0] > 1 else s[0]
        labelled = (lt != 0) if t.shape[0] == 1 else True  # a label-only side says nothing where it is 0
        return ((lt != ls) & labelled).astype(np.float32)
    return np.abs(t - s)


_DIFF_CMAP = matplotlib.colormaps["magma"]


def render_panel(path: Union[str, Path], images: Maps, rows: Sequence[PanelRow],
                 image_ids: Optional[Sequence[str]] = None, max_images: int = 4, title: str = "") -> Path:
    """One PNG: for each of the first ``max_images`` images and each head in ``rows``, a row of
    :data:`PANEL_COLUMNS` pictures (input; ground truth on the input; teacher; student; teacher on
    the input; student on the input; |teacher - student| heatmap, magma, 0..1, its mean noted).
    A missing teacher prediction reads "no teacher output" (its overlay and difference cells too);
    a missing ground truth reads "no ground truth".

    ``images`` (B, 3, H, W) float in [0, 1] (the student canvases). Predictions are resized to (H, W).
    The PNG is ``panel_size(n_images * len(rows), 7)`` pixels; picture (r, c) lies at
    ``cell_box(r, c)``. Written atomically; returns ``path``.
    """
    imgs = as_cpu_tensor(images).float()
    if imgs.dim() != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(imgs.shape)}")
    if not rows:
        raise ValueError("render_panel needs at least one PanelRow")
    n = min(int(max_images), imgs.shape[0])
    for r in rows:
        for who, p in (("student", r.student), ("teacher", r.teacher), ("ground truth", r.target)):
            if p is not None and p.num_images < n:
                raise ValueError(f"head '{r.name}': the {who} prediction has {p.num_images} images, "
                                 f"the panel shows {n}")
    hw = (int(imgs.shape[2]), int(imgs.shape[3]))
    ids = list(image_ids) if image_ids is not None else [f"image {i}" for i in range(n)]
    row_names = [f"{ids[i]}\n{r.name} ({r.student.kind})" for i in range(n) for r in rows]
    canvas = PanelCanvas(n * len(rows), len(PANEL_COLUMNS), title, PANEL_COLUMNS, row_names)
    for i in range(n):
        img = imgs[i].clamp(0, 1).permute(1, 2, 0).numpy()
        for j, r in enumerate(rows):
            row = i * len(rows) + j
            canvas.picture(row, 0, img)
            if r.target is not None:
                gt = _draw(r.target, i, hw, r.class_names)
                canvas.picture(row, 1, _overlay(img, gt), gt.boxes, gt.note)
            else:
                canvas.message(row, 1, "no ground truth")
            st = _draw(r.student, i, hw, r.class_names)
            canvas.picture(row, 3, _plain(st), st.boxes, st.note)
            canvas.picture(row, 5, _overlay(img, st), st.boxes)
            if r.teacher is None:
                for col in (2, 4, 6):
                    canvas.message(row, col, NO_TEACHER)
                continue
            te = _draw(r.teacher, i, hw, r.class_names)
            canvas.picture(row, 2, _plain(te), te.boxes, te.note)
            canvas.picture(row, 4, _overlay(img, te), te.boxes)
            diff = np.clip(difference_map(te, st, r.student.kind), 0, 1)
            canvas.picture(row, 6, _DIFF_CMAP(diff)[..., :3], note=f"mean {float(diff.mean()):.3f}")
    return canvas.save(path)

