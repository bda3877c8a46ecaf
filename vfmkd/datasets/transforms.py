"""Student views: the YOLO letterbox plus the geometric part of the YOLO augmentation recipe.

A view is one 2x3 matrix from original pixels to the student canvas. Without rotation the matrix
is axis-aligned and is also recorded as the per-axis affine ``(sx, sy, ox, oy)`` that the
distiller composes with a teacher's affine (``sx < 0`` when mirrored); with rotation there is no
axis-aligned map to a cached teacher grid, so such samples can only be distilled from a live
teacher pass (the mixer routes them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

from vfmkd.datasets.records import ViewGeometry

PAD_VALUE = 114


@dataclass(frozen=True)
class GeometricAugment:
    """YOLO's geometric recipe: horizontal flip probability, scale gain in [1 - scale, 1 + scale],
    translation up to ``translate`` x canvas size, rotation up to ``degrees``."""

    fliplr: float = 0.0
    scale: float = 0.0
    translate: float = 0.0
    degrees: float = 0.0

    @property
    def enabled(self) -> bool:
        return any((self.fliplr, self.scale, self.translate, self.degrees))


@dataclass
class StudentView:
    """``canvas`` (S, S, 3) uint8; ``matrix`` (2, 3) original -> canvas pixels; ``affine`` (4,) the same
    map as (sx, sy, ox, oy) or None when rotated; ``content_box`` (x1, y1, x2, y2) integer canvas
    pixels that hold image content (what a live teacher is shown)."""

    canvas: np.ndarray
    matrix: np.ndarray
    affine: Optional[Tuple[float, float, float, float]]
    flipped: bool
    content_box: Tuple[int, int, int, int]
    cropped: bool = False  # part of the image falls outside the canvas

    @property
    def rotated(self) -> bool:
        return self.affine is None

    def geometry(self, orig_hw: Tuple[int, int]) -> ViewGeometry:
        """The view without its pixels (what travels with a sample)."""
        m = self.matrix
        # A rotated view has no per-axis affine: its axis-aligned part is kept for shapes only.
        affine = self.affine or (float(m[0, 0]), float(m[1, 1]), float(m[0, 2]), float(m[1, 2]))
        return ViewGeometry(matrix=np.asarray(m, np.float64), affine=affine, content_box=self.content_box,
                            orig_hw=(int(orig_hw[0]), int(orig_hw[1])), flipped=self.flipped,
                            rotated=self.rotated, cropped=self.cropped)


def letterbox(img: np.ndarray, size: int) -> Tuple[np.ndarray, Tuple[float, float, float, float]]:
    """YOLO letterbox of an (H, W, 3) image to (size, size, 3), as ultralytics' ``LetterBox``
    (scale-up allowed, centred padding of 114). Returns the canvas and the affine (sx, sy, ox, oy):
    original pixel (x, y) -> canvas pixel (x * sx + ox, y * sy + oy)."""
    h, w = img.shape[:2]
    new_w, new_h, left, top = letterbox_geometry(h, w, size)
    if (new_w, new_h) != (w, h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    bottom, right = size - new_h - top, size - new_w - left
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, (new_w / w, new_h / h, float(left), float(top))


def letterbox_geometry(h: int, w: int, size: int) -> Tuple[int, int, int, int]:
    """(new_w, new_h, left, top) of the letterbox: whole-pixel content size and offsets (ultralytics')."""
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    return new_w, new_h, round((size - new_w) / 2 - 0.1), round((size - new_h) / 2 - 0.1)


def opencv_matrix(matrix: np.ndarray) -> np.ndarray:
    """The 2x3 ``matrix`` (continuous coordinates: pixel i spans [i, i + 1)) as OpenCV's warp
    matrix, which indexes pixel centres at integers: shifted by half a pixel on both sides, or a
    mirror lands one pixel off."""
    matrix = np.asarray(matrix, np.float64)
    cv_matrix = matrix.copy()
    cv_matrix[:, 2] += 0.5 * (matrix[:, 0] + matrix[:, 1]) - 0.5
    return cv_matrix


def box_candidates(before: np.ndarray, after: np.ndarray, min_side: float = 2.0,
                   min_area_ratio: float = 0.1) -> np.ndarray:
    """ultralytics' box-candidate rule on (n, 4) x1, y1, x2, y2 canvas boxes before and after
    clipping: kept when more than ``min_side`` pixels wide and high and more than
    ``min_area_ratio`` of the area remains."""
    area_before = (before[:, 2] - before[:, 0]) * (before[:, 3] - before[:, 1])
    nw, nh = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    return (nw > min_side) & (nh > min_side) & (nw * nh > min_area_ratio * np.maximum(area_before, 1e-9))


def _corners(matrix: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=np.float64) @ matrix.T


def _content_box(matrix: np.ndarray, w: int, h: int, size: int) -> Tuple[int, int, int, int]:
    corners = _corners(matrix, w, h)
    x1, y1 = np.floor(corners.min(0)).clip(0, size)
    x2, y2 = np.ceil(corners.max(0)).clip(0, size)
    return int(x1), int(y1), int(x2), int(y2)


def _is_cropped(matrix: np.ndarray, w: int, h: int, size: int) -> bool:
    corners = _corners(matrix, w, h)
    return bool((corners < -0.5).any() or (corners > size + 0.5).any())


def student_view(img: np.ndarray, size: int, aug: Optional[GeometricAugment] = None,
                 rng: Optional[np.random.Generator] = None) -> StudentView:
    """Letterbox ``img`` to ``size`` and apply a random draw of ``aug`` (none when ``aug`` is None)."""
    h, w = img.shape[:2]
    if aug is None or not aug.enabled:
        canvas, affine = letterbox(img, size)
        sx, sy, ox, oy = affine
        matrix = np.array([[sx, 0.0, ox], [0.0, sy, oy]])
        return StudentView(canvas, matrix, affine, False, _content_box(matrix, w, h, size))
    rng = rng or np.random.default_rng()
    # The letterbox's own whole-pixel geometry: a view that is not zoomed or moved (a flip) has whole-pixel
    # content edges, so the live teacher is not shown a blended sliver of padding as content (on a thin
    # image that sliver is a large part of its few teacher cells: BENCHMARKS.md, "Thin images").
    new_w, new_h, left, top = letterbox_geometry(h, w, size)
    base = np.array([[new_w / w, 0.0, left], [0.0, new_h / h, top], [0.0, 0.0, 1.0]])
    gain = rng.uniform(1 - aug.scale, 1 + aug.scale) if aug.scale else 1.0
    angle = rng.uniform(-aug.degrees, aug.degrees) if aug.degrees else 0.0
    shift = rng.uniform(-aug.translate, aug.translate, size=2) * size if aug.translate else np.zeros(2)
    flipped = bool(aug.fliplr and rng.random() < aug.fliplr)
    c = size / 2
    around_centre = cv2.getRotationMatrix2D((c, c), angle, gain)  # rotation + scale about the canvas centre
    around_centre = np.vstack([around_centre, [0.0, 0.0, 1.0]])
    move = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]], [0.0, 0.0, 1.0]])
    mirror = np.array([[-1.0, 0.0, size], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) if flipped else np.eye(3)
    matrix = (mirror @ move @ around_centre @ base)[:2]
    canvas = cv2.warpAffine(img, opencv_matrix(matrix), (size, size), flags=cv2.INTER_LINEAR,
                            borderValue=(PAD_VALUE,) * 3)
    axis_aligned = abs(matrix[0, 1]) < 1e-9 and abs(matrix[1, 0]) < 1e-9
    affine = (float(matrix[0, 0]), float(matrix[1, 1]), float(matrix[0, 2]),
              float(matrix[1, 2])) if axis_aligned else None
    return StudentView(canvas, matrix, affine, flipped, _content_box(matrix, w, h, size),
                       _is_cropped(matrix, w, h, size))


def transform_boxes(labels: np.ndarray, w: int, h: int, view: StudentView, size: int,
                    min_side: float = 2.0, min_area_ratio: float = 0.1, drop_small: bool = True,
                    return_kept: bool = False):
    """YOLO rows ``class cx cy w h`` (normalised to the original image) -> the same rows normalised
    to the student canvas. Corners go through the view's matrix; boxes are clipped to the canvas
    and, with ``drop_small``, dropped when cropping or scaling leaves less than ``min_side`` pixels
    or ``min_area_ratio`` of their area (ultralytics' box-candidate rule).

    Returns the (m, 5) float32 rows; with ``return_kept`` also the (m,) int64 indices of the input
    rows that were kept (so each box keeps its label-file row)."""
    if len(labels) == 0:
        rows = labels.reshape(0, 5).astype(np.float32)
        return (rows, np.zeros(0, np.int64)) if return_kept else rows
    cx, cy, bw, bh = labels[:, 1] * w, labels[:, 2] * h, labels[:, 3] * w, labels[:, 4] * h
    xs = np.stack([cx - bw / 2, cx + bw / 2, cx - bw / 2, cx + bw / 2], 1)
    ys = np.stack([cy - bh / 2, cy - bh / 2, cy + bh / 2, cy + bh / 2], 1)
    m = view.matrix
    tx = xs * m[0, 0] + ys * m[0, 1] + m[0, 2]
    ty = xs * m[1, 0] + ys * m[1, 1] + m[1, 2]
    before = np.stack([tx.min(1), ty.min(1), tx.max(1), ty.max(1)], 1)
    after = np.clip(before, 0, size)
    x1, y1, x2, y2 = after.T
    if drop_small:
        keep = box_candidates(before, after, min_side, min_area_ratio)
    else:
        keep = np.ones(len(labels), dtype=bool)
    rows = np.stack([labels[:, 0], (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size], 1)
    rows = rows[keep].astype(np.float32)
    return (rows, np.flatnonzero(keep).astype(np.int64)) if return_kept else rows
