"""Instance polygons and semantic/binary masks of the coco128 layout, carried through a student view.

Layout (beside ``root/images/<split>``):

- ``root/instance_segmentation/labels/<split>/<id>.txt``: YOLO-seg lines ``class x1 y1 x2 y2 ...``
  (normalised to the upright image); ``class`` is a COCO *panoptic* thing id, named in
  ``root/instance_segmentation/config.yaml`` ``names`` and mapped **by name** to the detection
  class ids of ``root/object_detection/config.yaml``.
- ``root/semantic_segmentation/masks/<split>/<id>.png``: single-channel PNG, pixel = panoptic
  category id, 0 = unlabeled; the ids are the keys of ``root/semantic_segmentation/config.yaml``
  ``classes`` and become the contiguous index k = position in the sorted id list (0 stays 0).
- Binary masks: the semantic pixels whose class name is one of the chosen names are 1, every other
  pixel of the image 0, letterbox/augmentation padding 255 (ignore).

Geometry: the view's 2x3 matrix maps original pixels to canvas pixels in continuous coordinates
(pixel i spans [i, i + 1)), the same matrix as the image and its boxes. Polygons are rasterised
at S/4 (ultralytics' ``mask_ratio`` 4); semantic maps are warped at S with nearest neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import yaml

from vfmkd.core.errors import DatasetError, did_you_mean
from vfmkd.datasets.records import InstanceTargets
from vfmkd.datasets.sources.split_list import label_lines
from vfmkd.datasets.transforms import box_candidates, opencv_matrix

INSTANCE_DIR = "instance_segmentation"
SEMANTIC_DIR = "semantic_segmentation"
DETECTION_CONFIG = Path("object_detection") / "config.yaml"
MASK_RATIO = 4  # instance masks at S / 4, as ultralytics' Segment head predicts them
MATCH_IOU = 0.5  # an instance is the detection box of its class it overlaps at least this much
_SHIFT = 4  # fractional bits of cv2.fillPoly vertices (sub-pixel polygon edges)
_PAD = np.iinfo(np.uint16).max  # semantic index marking padding while warping


def instance_label_dir(root: Path, split: str) -> Path:
    return Path(root) / INSTANCE_DIR / "labels" / split


def semantic_mask_dir(root: Path, split: str) -> Path:
    return Path(root) / SEMANTIC_DIR / "masks" / split


def read_names(path: Path, key: str) -> Dict[int, str]:
    """``{id: name}`` of the ``key`` table of a dataset ``config.yaml`` (a mapping, or a list = ids 0..n-1)."""
    if not path.is_file():
        raise DatasetError(f"class table not found: {path} (its '{key}:' maps class ids to names)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path} is not valid YAML: {exc}") from None
    names = data.get(key) if isinstance(data, dict) else None
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"{path} has no '{key}:' table of class ids to names")
    try:
        return {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: the '{key}:' keys must be integer class ids") from None


@dataclass(frozen=True)
class InstanceClassTable:
    """Panoptic thing id -> detection class id, matched by class name. ``source``: the instance
    config file, ``names``: its id -> name table, ``detection_source``: the detection config."""

    to_detection: Dict[int, int]
    names: Dict[int, str]
    source: Path
    detection_source: Path
    num_classes: int  # of the detection head: a polygon of a class beyond it is an error
    classes_key: str = "num_classes"  # the setting behind num_classes, named by the error

    @classmethod
    def load(cls, root: Path, num_classes: int, classes_key: str = "num_classes") -> InstanceClassTable:
        source = Path(root) / INSTANCE_DIR / "config.yaml"
        names = read_names(source, "names")
        det_file = Path(root) / DETECTION_CONFIG
        det = read_names(det_file, "names")
        by_name = {name: i for i, name in det.items()}
        table: Dict[int, int] = {}
        for pid, name in names.items():
            if name not in by_name:
                raise DatasetError(f"{source}: instance class {pid} '{name}' has no detection class of that name in "
                                   f"{det_file}.{did_you_mean(name, by_name)}")
            table[pid] = by_name[name]
        return cls(table, names, source, det_file, num_classes, classes_key)


@dataclass(frozen=True)
class SemanticClassTable:
    """The semantic classes: ``ids`` sorted panoptic ids (0 = unlabeled first), ``names`` in the same
    order; the contiguous index of a class is its position. ``source``: the config file."""

    ids: Tuple[int, ...]
    names: Tuple[str, ...]
    source: Path

    @classmethod
    def load(cls, root: Path) -> SemanticClassTable:
        source = Path(root) / SEMANTIC_DIR / "config.yaml"
        table = read_names(source, "classes")
        if 0 not in table:
            table[0] = "unlabeled"  # 0 is the ignore index whatever the file says
        ids = tuple(sorted(table))
        if min(ids) < 0 or len(ids) >= _PAD:
            raise DatasetError(f"{source}: class ids must be >= 0 and fewer than {_PAD}")
        return cls(ids, tuple(table[i] for i in ids), source)

    @property
    def num_classes(self) -> int:
        """Classes of a semantic head, index 0 (unlabeled, ignored) included."""
        return len(self.ids)

    def lookup(self) -> np.ndarray:
        """(max id + 1,) int64: panoptic id -> contiguous index, -1 where the id is not a class."""
        lut = np.full(max(self.ids) + 1, -1, np.int64)
        lut[list(self.ids)] = np.arange(len(self.ids))
        return lut

    def indices_of(self, names: Sequence[str]) -> np.ndarray:
        """Contiguous indices of the classes called ``names`` (``data.binary_classes``)."""
        position = {n: k for k, n in enumerate(self.names)}
        unknown = [n for n in names if n not in position]
        if unknown:
            valid = ", ".join(n for n in self.names[1:])
            raise DatasetError(f"binary class(es) {unknown} are not semantic classes of {self.source}."
                               f"{did_you_mean(unknown[0], self.names)} Valid names: {valid}")
        index = np.array(sorted({position[n] for n in names}), np.int64)
        if (index == 0).any():
            raise DatasetError(f"binary class '{self.names[0]}' is the unlabeled class (index 0) of {self.source}")
        return index

    def encode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """A PNG's panoptic ids -> (h, w) uint16 contiguous indices; an id outside the table is an error."""
        lut = self.lookup()
        raw = raw.astype(np.int64, copy=False)
        bad = raw >= len(lut)
        index = lut[np.where(bad, 0, raw)]
        bad |= index < 0
        if bad.any():
            values = sorted({int(v) for v in np.unique(raw[bad])})[:10]
            raise DatasetError(f"{path}: pixel value(s) {values} are not class ids of {self.source}")
        return index.astype(np.uint16)


def parse_polygons(path: Path, table: InstanceClassTable) -> Tuple[np.ndarray, List[np.ndarray]]:
    """A YOLO-seg label file -> (n,) int64 detection class ids and n (k, 2) float64 polygons
    normalised to the image. A line's class id must be in the instance class table; it needs an
    even number (>= 6) of coordinates in [0, 1]."""
    cls: List[int] = []
    polys: List[np.ndarray] = []
    for where, parts, values in label_lines(path):
        cid = values[0]
        if cid != int(cid) or int(cid) not in table.to_detection:
            known = sorted(table.to_detection)
            raise DatasetError(f"{where}: polygon class id {parts[0]} is not in the instance class table "
                               f"{table.source} (panoptic thing ids {known[0]}..{known[-1]}, {len(known)} classes)")
        det = table.to_detection[int(cid)]
        if det >= table.num_classes:
            raise DatasetError(f"{where}: polygon class {int(cid)} '{table.names[int(cid)]}' is detection class {det} "
                               f"of {table.detection_source}, outside [0, {table.num_classes}) "
                               f"({table.classes_key}={table.num_classes}); set {table.classes_key} to "
                               f"{max(read_names(table.detection_source, 'names')) + 1} (the classes of "
                               f"{table.detection_source})")
        coords = values[1:]
        if len(coords) % 2:
            raise DatasetError(f"{where}: odd number of polygon coordinates ({len(coords)}); expected "
                               f"'class x1 y1 x2 y2 ...' pairs")
        if len(coords) < 6:
            raise DatasetError(f"{where}: a polygon needs at least 3 points, got {len(coords) // 2}")
        if coords.min() < 0 or coords.max() > 1:
            raise DatasetError(f"{where}: polygon coordinates are not normalised to [0, 1]")
        cls.append(det)
        polys.append(coords.reshape(-1, 2))
    return np.asarray(cls, np.int64), polys


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) IoU of x1, y1, x2, y2 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).prod(1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def match_label_rows(cls: np.ndarray, polys: Sequence[np.ndarray], labels: np.ndarray,
                     min_iou: float = MATCH_IOU) -> np.ndarray:
    """(n,) int64: for each polygon the row of ``labels`` ((m, 5) class cx cy w h, normalised) of
    the same class whose box overlaps the polygon's box best, if that IoU >= ``min_iou``; else -1.
    IoU is unchanged by per-axis scaling, so normalised boxes give the pixel answer."""
    out = np.full(len(polys), -1, np.int64)
    if not len(polys) or not len(labels):
        return out
    pb = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polys])
    c, cx, cy, bw, bh = labels.astype(np.float64).T
    lb = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    iou = np.where(cls[:, None] == c.astype(np.int64)[None], _iou(pb, lb), -1.0)
    best = iou.argmax(1)
    ok = iou[np.arange(len(polys)), best] >= min_iou
    out[ok] = best[ok]
    return out


def _clip_edge(p: np.ndarray, axis: int, bound: float, below: bool) -> np.ndarray:
    """One Sutherland-Hodgman step: the part of polygon ``p`` (k, 2) with p[axis] <= bound (``below``) or >= bound."""
    if not len(p):
        return p
    q = np.roll(p, -1, axis=0)
    vp, vq = p[:, axis], q[:, axis]
    in_p = vp <= bound if below else vp >= bound
    in_q = vq <= bound if below else vq >= bound
    cross = in_p != in_q
    denom = np.where(cross, vq - vp, 1.0)
    t = np.where(cross, (bound - vp) / denom, 0.0)
    inter = p + t[:, None] * (q - p)
    out = np.stack([np.where(cross[:, None], inter, q), q], 1)  # (k, 2 slots, 2)
    valid = np.stack([cross | (in_p & in_q), ~in_p & in_q], 1)
    return out[valid]


def clip_polygon(p: np.ndarray, size: float) -> np.ndarray:
    """The part of polygon ``p`` (k, 2) inside the square [0, size]^2 (possibly empty)."""
    for axis in (0, 1):
        p = _clip_edge(p, axis, 0.0, below=False)
        p = _clip_edge(p, axis, float(size), below=True)
    return p


def instance_targets(cls: np.ndarray, polys: Sequence[np.ndarray], label_index: np.ndarray, w: int, h: int,
                     matrix: np.ndarray, size: int, drop_small: bool = True,
                     mask_ratio: int = MASK_RATIO) -> InstanceTargets:
    """The instances of one image on its canvas: each polygon (normalised to the (h, w) original)
    goes through ``matrix`` (original pixel -> canvas pixel), is clipped to the canvas for its box
    and rasterised at ``size // mask_ratio``. With ``drop_small`` an instance is dropped under the
    same candidate rule as boxes (:func:`~vfmkd.datasets.transforms.box_candidates`)."""
    m = np.asarray(matrix, np.float64)
    side = size // mask_ratio
    before, after, canvas_polys = [], [], []
    for poly in polys:
        pts = poly * (w, h) @ m[:, :2].T + m[:, 2]
        canvas_polys.append(pts)
        before.append([*pts.min(0), *pts.max(0)])
        inside = clip_polygon(pts, size)
        after.append([*inside.min(0), *inside.max(0)] if len(inside) else [0.0, 0.0, 0.0, 0.0])
    n = len(polys)
    before_a = np.asarray(before, np.float64).reshape(n, 4)
    after_a = np.asarray(after, np.float64).reshape(n, 4)
    keep = box_candidates(before_a, after_a) if drop_small else np.ones(n, bool)
    masks = np.zeros((int(keep.sum()), side, side), np.uint8)
    fine = np.zeros((side * mask_ratio, side * mask_ratio), np.uint8)
    for j, i in enumerate(np.flatnonzero(keep)):
        # Rasterised at canvas resolution, then a mask pixel is set where the polygon covers at least
        # half of its ratio x ratio block: cv2.fillPoly also paints the pixels its outline touches,
        # and at S/4 that bias (up to a whole mask pixel, one-sided) would shift small masks.
        # Continuous canvas coordinates -> OpenCV's pixel-centre coordinates, fixed point.
        pts = np.round((canvas_polys[i] - 0.5) * (1 << _SHIFT)).astype(np.int64)
        pts = np.clip(pts, -(1 << 26), 1 << 26).astype(np.int32)
        fine[:] = 0
        cv2.fillPoly(fine, [pts.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
        cover = fine.reshape(side, mask_ratio, side, mask_ratio).sum((1, 3), dtype=np.int32)
        masks[j] = cover * 2 >= mask_ratio * mask_ratio
    b = after_a[keep] / size
    boxes = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    return InstanceTargets(
        cls=torch.from_numpy(np.asarray(cls, np.float32)[keep]),
        boxes=torch.from_numpy(boxes.astype(np.float32).reshape(-1, 4)),
        masks=torch.from_numpy(masks),
        label_index=torch.from_numpy(np.asarray(label_index, np.int64)[keep]),
    )


def check_mask_size(mask: Path, image: Path, image_hw: Tuple[int, int], opener) -> None:
    """A semantic PNG must have its image's upright size (``image_hw`` after EXIF orientation)."""
    with opener(mask) as im:
        mw, mh = im.size
    h, w = image_hw
    if (mh, mw) != (h, w):
        raise DatasetError(f"mask {mask} is {mw}x{mh} (w x h) but its image {image} is {w}x{h} "
                           f"(upright, after EXIF orientation): a mask must have its image's size")


def read_mask(mask: Path, image: Path, image_hw: Tuple[int, int], opener) -> np.ndarray:
    """(h, w) integer array of a single-channel PNG (L, P, I or I;16) with its image's size."""
    with opener(mask) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise DatasetError(f"mask {mask} has mode {im.mode}: expected a single-channel PNG (L) of class ids")
        raw = np.asarray(im)
    if raw.shape[:2] != tuple(image_hw):
        h, w = image_hw
        raise DatasetError(f"mask {mask} is {raw.shape[1]}x{raw.shape[0]} (w x h) but its image {image} is {w}x{h} "
                           f"(upright, after EXIF orientation): a mask must have its image's size")
    return raw


def warp_index(index: np.ndarray, matrix: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Warp a (h, w) uint16 index map through the view (nearest neighbour) to (size, size);
    returns the map (padding 0) and the (size, size) bool padding mask."""
    warped = cv2.warpAffine(index, opencv_matrix(matrix), (size, size), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=int(_PAD))
    pad = warped == _PAD
    return np.where(pad, 0, warped), pad


def semantic_targets(index: np.ndarray, matrix: np.ndarray, size: int,
                     binary_index: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(S, S) int64 semantic index (padding 0) and, given the foreground class indices, the (S, S)
    uint8 binary mask (1 foreground, 0 other pixels, 255 padding) of a contiguous index map."""
    warped, pad = warp_index(index, matrix, size)
    semantic = torch.from_numpy(warped.astype(np.int64))
    binary = None
    if binary_index is not None:
        fg = np.isin(warped, binary_index).astype(np.uint8)
        binary = torch.from_numpy(np.where(pad, np.uint8(255), fg))
    return semantic, binary
