"""Pictures of what teacher and student predict, and of their feature maps.

Pure functions: tensors in, one PNG out (matplotlib Agg, written atomically), nothing kept between
calls. The trainer calls them every ``train.vis_interval`` epochs (``visualizations/epoch_XXX.png``)
and ``tools/test.py`` per sample batch (``visualizations/test_sample_XXX.png``); see
:func:`visualization_path`.

- :class:`Prediction`: one head's output (or its ground truth) for a batch, typed by ``kind``:
  ``semantic`` label maps, ``binary`` probability maps, ``instance`` masks with classes, ``boxes``.
  Every map is in the student canvas frame (the frame of ``images``) at any resolution (stride 4
  or 8 maps are resized to the image); boxes are xyxy canvas pixels.
- :func:`render_panel`: per shown image and per :class:`PanelRow` (one head), the columns
  :data:`PANEL_COLUMNS`: input, ground truth on the input, teacher, student, teacher on the input,
  student on the input, and the teacher-student difference map.
- :func:`pca_panel`: per distilled level the 3-component PCA of the teacher map next to the adapted
  student map projected with the same components and scaled with the teacher's range.
- :func:`write_test_results`: every metric of a test run as a readable text file.
"""
from __future__ import annotations

import colorsys
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from vfmkd.utils.plots import save_figure, write_text  # noqa: E402

KINDS = ("semantic", "binary", "instance", "boxes")
PANEL_COLUMNS = ("input", "ground truth", "teacher", "student", "teacher on input", "student on input",
                 "|teacher - student|")
CELL_PX = 160  # one picture
LABEL_PX = 120  # left margin: image id and head name of each row
HEADER_PX = 44  # top margin: title and column names (two lines)
DPI = 100
MAX_BOXES = 50  # boxes drawn per picture (highest scores first)
NO_TEACHER = "no teacher output"
Maps = Union[torch.Tensor, np.ndarray]


def colour_table(n: int = 256) -> np.ndarray:
    """(n, 3) uint8, the fixed class colours: index 0 (unlabelled / background) black, then hues
    spaced by the golden ratio with alternating saturation/value, the same in every run."""
    table = np.zeros((n, 3), np.uint8)
    for k in range(1, n):
        hue = (k * 0.618033988749895) % 1.0
        sat, val = (0.85, 1.0) if k % 2 else (0.6, 0.85)
        table[k] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return table


COLOURS = colour_table(256)


def class_colour(k: int) -> np.ndarray:
    """(3,) float in [0, 1] for class ``k`` (a detection class id k gets colour k + 1, never black)."""
    return COLOURS[1 + int(k) % (len(COLOURS) - 1)] / 255.0


def _t(x: Any) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x).detach().cpu()


def _per_image(x: Optional[Sequence[Any]]) -> Optional[List[torch.Tensor]]:
    return None if x is None else [_t(v) for v in x]


def split_by_image(values: Maps, batch_idx: Maps, num_images: int) -> List[torch.Tensor]:
    """Flat per-instance rows (N, ...) with their image index (N,) -> one tensor per image, e.g.
    teacher mask logits ``MaskLogits.logits`` / ``batch_idx`` into the per-image lists that
    :meth:`Prediction.instances` takes."""
    values, idx = _t(values), _t(batch_idx).long().view(-1)
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
                 ignore: Optional[Maps] = None) -> "Prediction":
        """Label maps (B, H, W) and/or class probabilities (B, K, H, W) (softmax of the logits)."""
        if labels is None and probs is None:
            raise ValueError("a semantic Prediction needs labels (B, H, W) or probs (B, K, H, W)")
        p = None if probs is None else _t(probs).float()
        lab = _t(labels).long() if labels is not None else p.argmax(1)  # type: ignore[union-attr]
        return cls("semantic", labels=lab, probs=p, ignore=None if ignore is None else _t(ignore).bool())

    @classmethod
    def binary(cls, probs: Maps, ignore: Optional[Maps] = None) -> "Prediction":
        """Foreground probabilities (B, H, W) or (B, 1, H, W) in [0, 1] (sigmoid of the logits)."""
        p = _t(probs).float()
        if p.dim() == 4:
            p = p[:, 0]
        return cls("binary", probs=p.clamp(0, 1), ignore=None if ignore is None else _t(ignore).bool())

    @classmethod
    def binary_target(cls, mask: Maps, ignore_value: int = 255) -> "Prediction":
        """Ground truth as ``Batch.binary``: (B, H, W) uint8 {0, 1}, ``ignore_value`` = not drawn."""
        m = _t(mask)
        return cls.binary((m == 1).float(), ignore=m == ignore_value)

    @classmethod
    def instances(cls, masks: Sequence[Maps], classes: Sequence[Maps], boxes: Optional[Sequence[Maps]] = None,
                  scores: Optional[Sequence[Maps]] = None) -> "Prediction":
        """Per image: masks (n, H, W) bool or probabilities, classes (n,), optional boxes (n, 4) xyxy
        canvas pixels and scores (n,). Flat (N, ...) tensors: see :func:`split_by_image`."""
        return cls("instance", masks=_per_image(masks), cls=_per_image(classes), boxes=_per_image(boxes),
                   scores=_per_image(scores))

    @classmethod
    def detections(cls, boxes: Sequence[Maps], classes: Sequence[Maps],
                   scores: Optional[Sequence[Maps]] = None) -> "Prediction":
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


def visualization_path(run_dir: Union[str, Path], kind: str, index: int, suffix: str = "") -> Path:
    """``run_dir/visualizations/{kind}_{index:03d}{suffix}.png``; kind ``epoch`` (training) or
    ``test_sample`` (tools/test.py); suffix e.g. ``_pca`` for the feature panel."""
    return Path(run_dir) / "visualizations" / f"{kind}_{int(index):03d}{suffix}.png"


# ----------------------------------------------------------------------------------------- layout
def panel_size(n_rows: int, n_cols: int) -> Tuple[int, int]:
    """(width, height) in pixels of a panel with this many picture rows and columns."""
    return LABEL_PX + n_cols * CELL_PX, HEADER_PX + n_rows * CELL_PX


def cell_box(row: int, col: int) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixels of picture (row, col) in a panel PNG."""
    x0, y0 = LABEL_PX + col * CELL_PX, HEADER_PX + row * CELL_PX
    return x0, y0, x0 + CELL_PX, y0 + CELL_PX


def _fit(text: str, n: int) -> str:
    """Each line of ``text`` cut to its last ``n`` characters (level names end in what matters)."""
    return "\n".join(line if len(line) <= n else "..." + line[-(n - 3):] for line in text.split("\n"))


class _Canvas:
    """A figure whose pictures sit on an exact pixel grid (no tight layout: sizes are predictable)."""

    def __init__(self, n_rows: int, n_cols: int, title: str, col_names: Sequence[str], row_names: Sequence[str]):
        self.w, self.h = panel_size(n_rows, n_cols)
        self.fig = plt.figure(figsize=(self.w / DPI, self.h / DPI), dpi=DPI)
        self.fig.patch.set_facecolor("white")
        if title:
            self.fig.text(4 / self.w, 1 - 3 / self.h, title, ha="left", va="top", fontsize=9, weight="bold")
        for c, name in enumerate(col_names):
            x0, y0, x1, _ = cell_box(0, c)
            self.fig.text((x0 + x1) / 2 / self.w, 1 - (y0 - 3) / self.h, _fit(name, 32), ha="center", va="bottom",
                          fontsize=7)
        for r, name in enumerate(row_names):
            _, y0, _, y1 = cell_box(r, 0)
            self.fig.text(4 / self.w, 1 - (y0 + y1) / 2 / self.h, name, ha="left", va="center", fontsize=7, wrap=True)

    def axes(self, row: int, col: int) -> Any:
        x0, y0, x1, y1 = cell_box(row, col)
        ax = self.fig.add_axes((x0 / self.w, 1 - y1 / self.h, (x1 - x0) / self.w, (y1 - y0) / self.h))
        ax.set_axis_off()
        return ax

    def picture(self, row: int, col: int, rgb: np.ndarray, boxes: Sequence[Tuple[np.ndarray, np.ndarray, str]] = (),
                note: str = "") -> None:
        ax = self.axes(row, col)
        h, w = rgb.shape[:2]
        ax.imshow(np.clip(rgb, 0, 1), extent=(0, w, h, 0), interpolation="nearest")
        for xyxy, colour, label in boxes:
            x1, y1, x2, y2 = (float(v) for v in xyxy)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.2))
            if label:
                ax.text(x1, y1, label, fontsize=5, color="black", va="bottom", ha="left", clip_on=True,
                        bbox=dict(facecolor=colour, edgecolor="none", pad=0.5, alpha=0.8))
        if note:
            ax.text(2, 2, note, fontsize=6, color="white", va="top", ha="left",
                    bbox=dict(facecolor="black", edgecolor="none", pad=0.5, alpha=0.6))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)

    def message(self, row: int, col: int, text: str) -> None:
        ax = self.axes(row, col)
        ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor="0.9", edgecolor="0.7"))
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="0.3", transform=ax.transAxes, wrap=True)

    def save(self, path: Union[str, Path]) -> Path:
        return save_figure(self.fig, path, dpi=DPI)


# ------------------------------------------------------------------------------------ rendering
def _resize(x: torch.Tensor, hw: Tuple[int, int], nearest: bool) -> torch.Tensor:
    """(…, h, w) -> (…, H, W); labels/bools nearest, probabilities bilinear."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:]).float()
    if flat.shape[0] == 0:
        return x.new_zeros((*lead, *hw))
    out = F.interpolate(flat, size=hw, mode="nearest") if nearest else F.interpolate(
        flat, size=hw, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *hw).to(x.dtype if nearest else torch.float32)


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
        lab = _resize(pred.labels[i], hw, nearest=True).long().numpy()  # type: ignore[index]
        colour = COLOURS[np.clip(lab, 0, len(COLOURS) - 1) % len(COLOURS)] / 255.0
        alpha = (lab != 0).astype(np.float32) * 0.6
        if pred.ignore is not None:
            alpha[_resize(pred.ignore[i], hw, nearest=True).numpy()] = 0.0
        value = (_resize(pred.probs[i], hw, nearest=False).numpy() if pred.probs is not None
                 else lab[None].astype(np.float32))
        present = [k for k in np.unique(lab).tolist() if k != 0]
        return _Drawn(colour, alpha, [], value, note=f"classes: {len(present)}")
    if pred.kind == "binary":
        p = _resize(pred.probs[i], hw, nearest=False).numpy()  # type: ignore[index]
        if pred.ignore is not None:
            ign = _resize(pred.ignore[i], hw, nearest=True).numpy().astype(bool)
            p = np.where(ign, 0.0, p)
        colour = np.stack([np.ones_like(p), 0.15 * np.ones_like(p), 0.15 * np.ones_like(p)], -1)
        gray = np.repeat(p[..., None], 3, -1)
        return _Drawn(colour, 0.6 * p, [], p, note=f"fg {float((p > 0.5).mean()):.1%}", plain=gray)
    if pred.kind == "instance":
        masks = pred.masks[i]  # type: ignore[index]
        cls = pred.cls[i].view(-1)  # type: ignore[index]
        prob = (_resize(masks.float(), hw, nearest=masks.dtype == torch.bool).numpy() if len(masks)
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
    variation 0.5 * sum_k |p_t - p_s| with probabilities on both sides, else label disagreement."""
    t, s = teacher.value, student.value
    if kind == "semantic":
        if t.shape[0] > 1 and t.shape == s.shape:
            return 0.5 * np.abs(t - s).sum(0)
        lt = t.argmax(0) if t.shape[0] > 1 else t[0]
        ls = s.argmax(0) if s.shape[0] > 1 else s[0]
        return (lt != ls).astype(np.float32)
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
    imgs = _t(images).float()
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
    canvas = _Canvas(n * len(rows), len(PANEL_COLUMNS), title, PANEL_COLUMNS, row_names)
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


# ------------------------------------------------------------------------------------------ PCA
def pca_basis(teacher: Maps, valid: Optional[Maps] = None, k: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and the top-``k`` principal directions (C, k) of the teacher's valid cells.

    ``teacher`` (B, C, h, w); ``valid`` (B, h, w) bool (None: all cells). Exact eigendecomposition
    of the covariance in float64 (deterministic, unlike randomised ``pca_lowrank``); each
    direction's sign is fixed so its largest loading is positive. Fewer than ``k`` channels or
    cells: the missing directions are zero."""
    t = _t(teacher).double()
    cells = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if valid is not None:
        cells = cells[_t(valid).bool().reshape(-1)]
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
    t, s = _t(teacher).double(), _t(student).double()
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"the student map has {s.shape[1]} channels, the teacher map {t.shape[1]}: pass the "
                         "adapter output (teacher channels)")
    if s.shape[-2:] != t.shape[-2:]:
        s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    b, _, h, w = t.shape
    v = (torch.ones(b, h, w, dtype=torch.bool) if valid is None
         else _resize(_t(valid).bool(), (h, w), nearest=True).bool())
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
    n = min([int(max_images)] + [int(_t(m).shape[0]) for m in teacher_maps.values()])
    cols: List[str] = (["input"] if images is not None else [])
    for lvl in levels:
        cols += [f"{lvl}\nteacher PCA", f"{lvl}\nstudent (same PCA)"]
    ids = list(image_ids) if image_ids is not None else [f"image {i}" for i in range(n)]
    canvas = _Canvas(n, len(cols), title, cols, ids[:n])
    first = 0
    if images is not None:
        imgs = _t(images).float()
        for i in range(n):
            canvas.picture(i, 0, imgs[i].clamp(0, 1).permute(1, 2, 0).numpy())
        first = 1
    for li, lvl in enumerate(levels):
        t = _t(teacher_maps[lvl])[:n]
        v = None if valid is None or lvl not in valid else _t(valid[lvl])[:n]
        c = first + 2 * li
        if lvl not in student_maps:
            t_rgb, _ = pca_project(t, t, v)
            for i in range(n):
                canvas.picture(i, c, t_rgb[i])
                canvas.message(i, c + 1, "no student map")
            continue
        t_rgb, s_rgb = pca_project(t, _t(student_maps[lvl])[:n], v)
        for i in range(n):
            canvas.picture(i, c, t_rgb[i])
            canvas.picture(i, c + 1, s_rgb[i])
    return canvas.save(path)


# -------------------------------------------------------------------------------- test results
def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.size == 1):
        return v.item()
    return v


def _fmt(v: Any) -> str:
    v = _scalar(v)
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return "nan" if math.isnan(v) else f"{float(v):.4f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return "[" + ", ".join(_fmt(x) for x in np.asarray(v.tolist()).reshape(-1).tolist()) + "]"
    return str(v)


def _table(name: str, rows: Mapping[Any, Any]) -> List[str]:
    """name -> value (one value column) or, when every value is a flat dict, name -> {column: value}
    (a column per inner key, ``-`` where a row lacks it)."""
    keys = [str(k) for k in rows]
    width = max([len(k) for k in keys] + [len("name")])
    lines = [f"[{name}] ({len(rows)} rows)"]
    if rows and all(isinstance(v, Mapping) for v in rows.values()):
        cols: List[str] = []
        for v in rows.values():
            cols += [str(c) for c in v if str(c) not in cols]
        by_name = [{str(a): b for a, b in v.items()} for v in rows.values()]
        cells = [[_fmt(r.get(c)) for c in cols] for r in by_name]
        widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(cols)]
        lines.append("  " + "name".ljust(width) + "  " + "  ".join(c.rjust(wd) for c, wd in zip(cols, widths)))
        for k, r in zip(keys, cells):
            lines.append("  " + k.ljust(width) + "  " + "  ".join(x.rjust(wd) for x, wd in zip(r, widths)))
    else:
        lines += ["  " + k.ljust(width) + "  " + _fmt(v) for k, v in zip(keys, rows.values())]
    return lines


def _depth(x: Any) -> int:
    """0 for a plain value, 1 for a mapping of plain values, 2 for a mapping of such mappings, ..."""
    if not isinstance(x, Mapping):
        return 0
    return 1 + max([_depth(v) for v in x.values()] + [0])


def _section(name: str, rows: Mapping[Any, Any]) -> List[str]:
    """One table for a flat dict or a dict of flat dicts; otherwise the plain values as one table
    and a section per nested dict (``name/key``)."""
    if _depth(rows) <= 1 or all(_depth(v) == 1 for v in rows.values()):
        return ["", *_table(name, rows)]
    plain = {k: v for k, v in rows.items() if not isinstance(v, Mapping)}
    lines = ["", *_table(name, plain)] if plain else []
    for k, v in rows.items():
        if isinstance(v, Mapping):
            lines += _section(f"{name}/{k}", v)
    return lines


def format_test_results(metrics: Mapping[str, Any], header: Optional[Mapping[str, Any]] = None) -> str:
    """The text of :func:`write_test_results`."""
    lines = ["vfmkd test results", "=================="]
    for k, v in (header or {}).items():
        lines.append(f"{k}: {_fmt(v)}")
    if header:
        lines.append("")
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    if scalars:
        width = max(len(str(k)) for k in scalars)
        lines.append("metrics")
        lines += [f"  {str(k).ljust(width)}  {_fmt(v)}" for k, v in scalars.items()]
    for name, rows in metrics.items():
        if isinstance(rows, Mapping):
            lines += _section(str(name), rows)
    return "\n".join(lines) + "\n"


def write_test_results(path: Union[str, Path], metrics: Mapping[str, Any],
                       header: Optional[Mapping[str, Any]] = None) -> Path:
    """A readable text file of every metric: scalars first (``name  value``, floats to 4 decimals),
    then one table per dict-valued metric (per class: ``class  value``; class -> {metric: value}
    gets a column per metric; deeper nesting one table per inner dict). ``header`` (e.g. checkpoint,
    dataset, split) is listed first. Written atomically; returns ``path``."""
    return write_text(path, format_test_results(metrics, header))
