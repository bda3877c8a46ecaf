"""A COCO instances JSON (``instances_<split>.json``) as a :class:`SplitList`.

Boxes are the annotations' ``bbox`` (x, y, w, h pixels); masks their ``segmentation``: polygons (several
parts joined by ultralytics' ``merge_multi_segment``, as its COCO converter does) or RLE (decoded by
pycocotools, its outer contours traced by ultralytics' ``masks2segments``). COCO category ids become
contiguous class ids in sorted id order, named by the JSON's ``categories``. Crowd annotations are left
out (ultralytics' converter does the same); an image listed without annotations has no objects.
Counted and named skips: an image file that is not there, an annotation of an unknown category id or
an unknown image id, a box of zero size.

Images: ``<root>/images/<split>``, else ``<root>/<split>``, else ``<root>``, joined with ``file_name``.
The JSON: ``data.train_json`` / ``data.val_json``, else ``<root>/annotations/instances_<split>.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from pycocotools import mask as mask_utils
from ultralytics.data.converter import merge_multi_segment
from ultralytics.utils.ops import masks2segments

from vfmkd.core.errors import DatasetError
from vfmkd.datasets.sources.split_list import Polygons, SplitList, warn_skipped


def default_json(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def image_folder(root: Path, split: str, first_file: Optional[str]) -> Path:
    """The folder the JSON's ``file_name`` entries are relative to (the first that holds the first image)."""
    candidates = [root / "images" / split, root / split, root]
    for folder in candidates:
        if first_file is not None and (folder / first_file).is_file():
            return folder
    return next((c for c in candidates if c.is_dir()), root)


def _read(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"COCO annotations not found: {path} (set data.train_json / data.val_json, or put "
                           f"annotations/instances_<split>.json under data.root)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DatasetError(f"{path} is not a COCO instances file (lists 'images', 'annotations', 'categories')")
    return data


def polygon_of(segmentation: Any, h: int, w: int) -> Optional[np.ndarray]:
    """(k, 2) float64 polygon normalised to the (h, w) image, or None when there is no usable one."""
    if isinstance(segmentation, dict) and "counts" in segmentation:
        rle = mask_utils.frPyObjects(segmentation, h, w) if isinstance(segmentation["counts"], list) else segmentation
        pts = masks2segments(mask_utils.decode(rle)[None].astype(np.uint8))[0]
    elif isinstance(segmentation, list):
        parts = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and not len(p) % 2]
        if not parts:
            return None
        pts = np.concatenate(merge_multi_segment(parts), 0) if len(parts) > 1 else np.asarray(parts[0]).reshape(-1, 2)
    else:
        return None
    if len(pts) < 3:
        return None
    return np.clip(np.asarray(pts, np.float64) / (w, h), 0.0, 1.0)


def _box(bbox: Any, h: int, w: int) -> Optional[List[float]]:
    """Normalised cx, cy, w, h of a COCO pixel box clipped to the image; None when it is empty."""
    x, y, bw, bh = (float(v) for v in bbox)
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
    if x2 <= x1 or y2 <= y1:
        return None
    return [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]


def _check_classes(names: Dict[int, str], path: Path, num_classes: int, classes_key: str) -> None:
    if len(names) > num_classes:
        raise DatasetError(f"{path} has {len(names)} categories but {classes_key}={num_classes}; set {classes_key}="
                           f"{len(names)}")


def load_split(path: Path, root: Path, split: str, num_classes: int, classes_key: str) -> SplitList:
    """The images of the COCO instances JSON ``path`` with their boxes and polygons."""
    data = _read(path)
    try:
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        names_by_id = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {int(im["id"]): (str(im["file_name"]), int(im["height"]), int(im["width"])) for im in data["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: categories need id and name, images id, file_name, height and width "
                           f"({type(exc).__name__}: {exc})") from None
    contiguous = {cid: k for k, cid in enumerate(cat_ids)}
    names = {k: names_by_id[cid] for cid, k in contiguous.items()}
    _check_classes(names, path, num_classes, classes_key)
    rows: Dict[int, List[List[float]]] = {i: [] for i in images}
    polys: Dict[int, List[Tuple[int, np.ndarray, int]]] = {i: [] for i in images}
    skipped: List[Tuple[str, str]] = []
    for ann in data.get("annotations") or []:
        image_id, cat = int(ann.get("image_id", -1)), int(ann.get("category_id", -1))
        what = f"annotation {ann.get('id', '?')}"
        if image_id not in images:
            skipped.append((what, f"image_id {image_id} is not in 'images'"))
            continue
        if cat not in contiguous:
            skipped.append((what, f"unknown category_id {cat} (categories: {cat_ids[:10]}"
                                  f"{'...' if len(cat_ids) > 10 else ''})"))
            continue
        if ann.get("iscrowd"):
            continue
        _, h, w = images[image_id]
        box = _box(ann.get("bbox", (0, 0, 0, 0)), h, w)
        if box is None:
            skipped.append((what, f"empty bbox {ann.get('bbox')}"))
            continue
        poly = polygon_of(ann.get("segmentation"), h, w)
        if poly is not None:
            polys[image_id].append((contiguous[cat], poly, len(rows[image_id])))
        rows[image_id].append([float(contiguous[cat]), *box])
    order = sorted(images, key=lambda i: images[i][0])
    folder = image_folder(root, split, images[order[0]][0] if order else None)
    paths: List[Path] = []
    boxes: List[Optional[np.ndarray]] = []
    polygons: List[Optional[Polygons]] = []
    for i in order:
        file = folder / images[i][0]
        if not file.is_file():
            skipped.append((f"image {i} {images[i][0]}", f"file not found in {folder}"))
            continue
        paths.append(file)
        boxes.append(np.asarray(rows[i], np.float32).reshape(-1, 5))
        polygons.append((np.array([c for c, _, _ in polys[i]], np.int64), [p for _, p, _ in polys[i]],
                         np.array([r for _, _, r in polys[i]], np.int64)))
    if not paths:
        raise DatasetError(f"{path}: none of its {len(images)} images were found under {folder}")
    split_list = SplitList(paths, boxes, polygons, names, str(path), skipped)
    warn_skipped(skipped, str(path))
    return split_list
