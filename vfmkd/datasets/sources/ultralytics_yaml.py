"""An ultralytics dataset YAML (``path``, ``train``, ``val``, ``names``) as a :class:`SplitList`.

As ultralytics reads it: ``path`` is the dataset root (relative: to the YAML's folder; absent: that
folder); a split entry is an image folder (any depth), a ``.txt`` list of image paths (relative ones
to the list's folder) or a list of those; an image's label file is found with ultralytics' own
``img2label_paths`` (the last ``/images/`` -> ``/labels/``, extension -> ``.txt``). A label line is
``cls cx cy w h`` (a box) or ``cls x1 y1 x2 y2 ...`` (a polygon, its box the polygon's bounds), all
normalised; an image without a label file has no objects (ultralytics' background image). Nothing is
downloaded: a missing folder is an error naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import yaml
from ultralytics.data.utils import check_class_names, img2label_paths

from vfmkd.core.errors import DatasetError
from vfmkd.datasets.sources.split_list import Polygons, SplitList, find_images, is_image, label_lines, warn_skipped

YAML_SUFFIXES = (".yaml", ".yml")


def read_dataset_yaml(path: Path) -> Tuple[Path, Dict[str, Any], Dict[int, str]]:
    """(dataset root, the YAML's mapping, contiguous class id -> name) of an ultralytics dataset YAML."""
    if not path.is_file():
        raise DatasetError(f"dataset YAML not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "train" not in data:
        raise DatasetError(f"{path} is not an ultralytics dataset YAML: it needs 'train:' and 'val:' (image folders, "
                           f".txt lists or lists of them) and 'names:'")
    names = data.get("names")
    if names is None and isinstance(data.get("nc"), int):
        names = [f"class_{i}" for i in range(data["nc"])]
    if not isinstance(names, (list, dict)) or not names:
        raise DatasetError(f"{path}: 'names:' must be a list or a {{id: name}} mapping of the classes")
    try:
        table = {int(k): str(v) for k, v in check_class_names(names).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: 'names:' {exc}") from None
    root = Path(str(data.get("path") or "."))
    return (root if root.is_absolute() else path.parent / root), data, table


def split_key(data: Dict[str, Any], split: str, path: Path) -> str:
    """The YAML key of ``split``: the key itself, else the key it starts with (train2017 -> train)."""
    if data.get(split):
        return split
    for key in ("train", "val", "test"):
        if split.startswith(key) and data.get(key):
            return key
    if split.startswith("val") and data.get("validation"):
        return "validation"
    listed = [k for k in ("train", "val", "test") if data.get(k)]
    raise DatasetError(f"{path} has no '{split}:' entry (it has {', '.join(listed) or 'none'}); a split name is a "
                       f"key of the YAML or starts with one (train2017 -> train)")


def _listed_images(listing: Path) -> List[Path]:
    lines = [s.strip() for s in listing.read_text(encoding="utf-8").splitlines() if s.strip()]
    out = [Path(s) if Path(s).is_absolute() else listing.parent / s for s in lines]
    return [p for p in out if is_image(p)]


def image_files(root: Path, entry: Any, path: Path) -> Tuple[List[Path], List[Path]]:
    """(image files, image folders) of a split entry: a folder, a .txt list, or a list of them."""
    files: List[Path] = []
    folders: List[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        where = root / str(item)
        if where.is_dir():
            folders.append(where)
            files += find_images(where)
        elif where.is_file() and where.suffix == ".txt":
            files += _listed_images(where)
        else:
            raise DatasetError(f"{path}: split entry '{item}' -> {where} is neither an image folder nor a .txt list "
                               f"of image paths (nothing is downloaded)")
    return files, folders


def _row_error(where: str, message: str) -> DatasetError:
    return DatasetError(f"{where}: {message}")


def parse_label_file(label: Path, names: Dict[int, str], names_source: Path, num_classes: int,
                     classes_key: str) -> Tuple[np.ndarray, Optional[Polygons]]:
    """(n, 5) float32 ``cls cx cy w h`` rows of a YOLO(-seg) label file and its polygons (None: no polygon
    line). A class id outside the YAML's names or the head's classes names the file and line."""
    rows: List[List[float]] = []
    cls: List[int] = []
    polys: List[np.ndarray] = []
    poly_rows: List[int] = []
    for where, parts, values in label_lines(label):
        c = values[0]
        if c != int(c):
            raise _row_error(where, f"class id {parts[0]} is not an integer (a line is 'cls cx cy w h' or "
                                    f"'cls x1 y1 x2 y2 ...')")
        if not 0 <= c < len(names):
            raise _row_error(where, f"class id {parts[0]} is not in the class table of {names_source} ({len(names)} "
                                    f"names, ids 0..{len(names) - 1}); fix the label or the YAML's 'names:'")
        if c >= num_classes:
            raise _row_error(where, f"class id {parts[0]} is outside [0, {num_classes}) ({classes_key}="
                                    f"{num_classes}); set {classes_key}={len(names)} (the YAML's class count)")
        coords = values[1:]
        if coords.min() < 0 or coords.max() > 1:
            raise _row_error(where, "coordinates are not normalised to [0, 1]")
        if len(coords) == 4:
            rows.append([c, *coords])
            continue
        if len(coords) % 2 or len(coords) < 6:
            raise _row_error(where, f"{len(coords)} coordinates: a box has 4, a polygon an even number >= 6")
        pts = coords.reshape(-1, 2)
        (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
        poly_rows.append(len(rows))
        rows.append([c, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        cls.append(int(c))
        polys.append(pts)
    boxes = np.asarray(rows, np.float32).reshape(-1, 5)
    if not polys:
        return boxes, None
    return boxes, (np.asarray(cls, np.int64), polys, np.asarray(poly_rows, np.int64))


def orphan_labels(images: List[Path], folders: List[Path]) -> List[Tuple[str, str]]:
    """Label files under the label folders of ``folders`` that no listed image owns."""
    owned = {Path(p) for p in img2label_paths([str(i) for i in images])}
    orphans: List[Tuple[str, str]] = []
    for folder in folders:
        label_dir = Path(img2label_paths([str(folder / "x.jpg")])[0]).parent
        if label_dir == folder or not label_dir.is_dir():
            continue
        orphans += [(str(p), "a label file without its image") for p in sorted(label_dir.rglob("*.txt"))
                    if p not in owned]
    return orphans


def load_split(path: Path, split: str, num_classes: int, classes_key: str) -> SplitList:
    """The split ``split`` of the dataset YAML ``path`` (see the module docstring)."""
    root, data, names = read_dataset_yaml(path)
    key = split_key(data, split, path)
    images, folders = image_files(root, data[key], path)
    if not images:
        raise DatasetError(f"{path}: split '{key}' lists no images ({', '.join(str(f) for f in folders) or key})")
    labels = [Path(p) for p in img2label_paths([str(i) for i in images])]
    boxes: List[Optional[np.ndarray]] = []
    polygons: List[Optional[Polygons]] = []
    for label in labels:
        if label.is_file():
            b, poly = parse_label_file(label, names, path, num_classes, classes_key)
        else:  # ultralytics' background image: labelled, no objects
            b, poly = np.zeros((0, 5), np.float32), None
        boxes.append(b)
        polygons.append(poly)
    if any(p is not None for p in polygons):  # a segment dataset: an image without polygons has no instances
        empty = (np.zeros(0, np.int64), [], np.zeros(0, np.int64))
        polygons = [p if p is not None else empty for p in polygons]
    split_list = SplitList(images, boxes, polygons, names, f"{path} ({key})", orphan_labels(images, folders))
    warn_skipped(split_list.skipped, split_list.source)
    return split_list
