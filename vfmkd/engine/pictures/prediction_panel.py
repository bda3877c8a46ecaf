"""Pictures of what teacher and student predict, per head: :class:`Prediction` (one head's output or
ground truth for a batch), :class:`PanelRow` (one head in a panel) and :func:`render_panel` (one PNG,
drawn on :mod:`vfmkd.engine.pictures.vis_canvas`'s layout). Pure functions: tensors in, one PNG out, nothing
kept between calls.

- :class:`Prediction`: one head's output (or its ground truth) for a batch, typed by ``kind``:
  ``semantic`` label maps, ``binary`` probability maps, ``instance`` masks with classes, ``boxes``.
  Every map is in the student canvas frame (the frame of ``images``) at any resolution (stride 4
  or 8 maps are resized to the image); boxes are xyxy canvas pixels.
- :func:`render_panel`: per shown image and per :class:`PanelRow` (one head), the columns
  :data:`PANEL_COLUMNS`: input, ground truth on the input, teacher, student, teacher on the input,
  student on the input, and the teacher-student difference map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import matplotlib
import numpy as np
import torch

from vfmkd.engine.pictures.vis_canvas import COLOURS, Maps, PanelCanvas, as_cpu_tensor, class_colour, resize_map

KINDS = ("semantic", "binary", "instance", "boxes")
PANEL_COLUMNS = ("input", "ground truth", "teacher", "student", "teacher on input", "student on input",
                 "|teacher - student|")
MAX_BOXES = 50  # boxes drawn per picture (highest scores first)
NO_TEACHER = "no teacher output"


def _per_image(x: Optional[Sequence[Any]]) -> Optional[List[torch.Tensor]]:
    return None if x is None else [as_cpu_tensor(v) for v in x]


def split_by_image(values: Maps, batch_idx: Maps, num_images: int) -> List[torch.Tensor]:
    """Flat per-instance rows (N, ...) with their image index (N,) -> one tensor per image, e.g.
    teacher mask logits ``MaskLogits.logits`` / ``batch_idx`` into the per-image lists that
    :meth:`Prediction.instances` takes."""
    values, idx = as_cpu_tensor(values), as_cpu_tensor(batch_idx).long().view(-1)
    return [values[idx == i] for i in range(num_images)]


@dataclass
class Prediction:
    """One head's prediction (or ground truth) for a batch of B images, typed by ``kind``.

    - ``semantic``: ``labels`` (B, H, W) int class index (0 = unlabelled, drawn black) and/or
      ``probs`` (B, K, H, W) softmax probabilities (labels = argmax when only probs are given; the
      difference map uses probs when both sides have them, else label disagreement).
    - ``binary``: ``probs`` (B, H, W) foreground probability in [0, 1]; ``ignore`` (B, H, W) bool
      pixels not drawn (ground-truth padding, 255 in ``Batch.binary``).
    - ``instance``: ``masks`` per image (n, H, W), bool or float probabilities in [0, 1]
      (thresholded at 0.5 for drawing), ``cls`` per image (n,), optional ``boxes`` (n, 4) xyxy
      canvas pixels and ``scores`` (n,).
    - ``boxes``: ``boxes`` per image (n, 4) xyxy canvas pixels, ``cls`` (n,), optional ``scores``.

    Build with the class methods (:meth:`semantic`, :meth:`binary`, :meth:`binary_target`,
    :meth:`instances`, :meth:`detections`); maps may have any resolution (resized to the image).
    """

    kind: str
    labels: Optional[torch.Tensor] = None
    probs: Optional[torch.Tensor] = None
    ignore: Optional[torch.Tensor] = None
    masks: Optional[List[torch.Tensor]] = None
    boxes: Optional[List[torch.Tensor]] = None
    cls: Optional[List[torch.Tensor]] = None
    scores: Optional[List[torch.Tensor]] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Prediction kind '{self.kind}' is not one of {', '.join(KINDS)}")
        need = {"semantic": ("labels",), "binary": ("probs",), "instance": ("masks", "cls"), "boxes": ("boxes", "cls")}
        missing = [f for f in need[self.kind] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a '{self.kind}' Prediction needs {', '.join(missing)}")
        per_image = [getattr(self, f) for f in ("masks", "boxes", "cls", "scores") if getattr(self, f) is not None]
        if len({len(v) for v in per_image}) > 1:
            raise ValueError(f"a '{self.kind}' Prediction has per-image lists of different lengths")

    @property
    def num_images(self) -> int:
        if self.kind in ("semantic", "binary"):
            return int((self.labels if self.labels is not None else self.probs).shape[0])
        return len(self.cls)  # type: ignore[arg-type]

    @classmethod
    def semantic(cls, labels: Optional[Maps] = None, probs: Optional[Maps] = None,
                 ignore: Optional[Maps] = None) -> Prediction:
        """Label maps (B, H, W) and/or class probabilities (B, K, H, W) (softmax of the logits)."""
        if labels is None and probs is None:
            raise ValueError("a semantic Prediction needs labels (B, H, W) or probs (B, K, H, W)")
        p = None if probs is None else as_cpu_tensor(probs).float()
        lab = as_cpu_tensor(labels).long() if labels is not None else p.argmax(1)  # type: ignore[union-attr]
        return cls("semantic", labels=lab, probs=p, ignore=None if ignore is None else as_cpu_tensor(ignore).bool())

    @classmethod
    def binary(cls, probs: Maps, ignore: Optional[Maps] = None) -> Prediction:
        """Foreground probabilities (B, H, W) or (B, 1, H, W) in [0, 1] (sigmoid of the logits)."""
        p = as_cpu_tensor(probs).float()
        if p.dim() == 4:
            p = p[:, 0]
        return cls("binary", probs=p.clamp(0, 1), ignore=None if ignore is None else as_cpu_tensor(ignore).bool())

    @classmethod
    def binary_target(cls, mask: Maps, ignore_value: int = 255) -> Prediction:
        """Ground truth as ``Batch.binary``: (B, H, W) uint8 {0, 1}, ``ignore_value`` = not drawn."""
        m = as_cpu_tensor(mask)
        return cls.binary((m == 1).float(), ignore=m == ignore_value)

    @classmethod
    def instances(cls, masks: Sequence[Maps], classes: Sequence[Maps], boxes: Optional[Sequence[Maps]] = None,
                  scores: Optional[Sequence[Maps]] = None) -> Prediction:
        """Per image: masks (n, H, W) bool or probabilities, classes (n,), optional boxes (n, 4) xyxy
        canvas pixels and scores (n,). Flat (N, ...) tensors: see :func:`split_by_image`."""
        return cls("instance", masks=_per_image(masks), cls=_per_image(classes), boxes=_per_image(boxes),
                   scores=_per_image(scores))

    @classmethod
    def detections(cls, boxes: Sequence[Maps], classes: Sequence[Maps],
                   scores: Optional[Sequence[Maps]] = None) -> Prediction:
        """Per image: boxes (n, 4) xyxy canvas pixels, classes (n,), optional scores (n,)."""
        return cls("boxes", boxes=_per_image(boxes), cls=_per_image(classes), scores=_per_image(scores))


@dataclass
class PanelRow:
    """One head in a panel: the student's prediction, the teacher's (None: the teacher has no
    output for this head, drawn as "no teacher output") and the ground truth (None: not drawn).
    ``class_names`` label boxes (detection class ids index it)."""

    name: str
    student: Prediction
    teacher: Optional[Prediction] = None
    target: Optional[Prediction] = None
    class_names: Optional[Sequence[str]] = None


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
    if pred.kind == "semantic":
        lab = resize_map(pred.labels[i], hw, nearest=True).long().numpy()  # type: ignore[index]
        colour = COLOURS[np.clip(lab, 0, len(COLOURS) - 1) % len(COLOURS)] / 255.0
        alpha = (lab != 0).astype(np.float32) * 0.6
        if pred.ignore is not None:
            alpha[resize_map(pred.ignore[i], hw, nearest=True).numpy()] = 0.0
        value = (resize_map(pred.probs[i], hw, nearest=False).numpy() if pred.probs is not None
                 else lab[None].astype(np.float32))
        present = [k for k in np.unique(lab).tolist() if k != 0]
        return _Drawn(colour, alpha, [], value, note=f"classes: {len(present)}")
    if pred.kind == "binary":
        p = resize_map(pred.probs[i], hw, nearest=False).numpy()  # type: ignore[index]
        if pred.ignore is not None:
            ign = resize_map(pred.ignore[i], hw, nearest=True).numpy().astype(bool)
            p = np.where(ign, 0.0, p)
        colour = np.stack([np.ones_like(p), 0.15 * np.ones_like(p), 0.15 * np.ones_like(p)], -1)
        gray = np.repeat(p[..., None], 3, -1)
        return _Drawn(colour, 0.6 * p, [], p, note=f"fg {float((p > 0.5).mean()):.1%}", plain=gray)
    if pred.kind == "instance":
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
    if kind == "semantic":
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

