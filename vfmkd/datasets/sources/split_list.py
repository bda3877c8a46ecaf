"""The record every data source hands the dataset: one split's image list and per-image labels.

A source (one module per format: :mod:`.ultralytics_yaml`, :mod:`.coco_json`, :mod:`.image_folder`)
reads its files into a :class:`SplitList`; :class:`~vfmkd.datasets.coco_yolo.DetectionDataset`
consumes it with the same loader, views, masks and targets as vfmkd's own folder layout.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from vfmkd.core.errors import DatasetError

LOGGER = logging.getLogger("vfmkd")
#: image file suffixes every source lists (compared case-insensitively); TIFF: 16-bit medical data
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: per image: (n,) int64 class ids, n (k, 2) float64 polygons normalised to the image, (n,) int64 the
#: row of the image's boxes each polygon belongs to (-1: none)
Polygons = Tuple[np.ndarray, List[np.ndarray], np.ndarray]


@dataclass
class SplitList:
    """One split of a dataset, whatever format it came from.

    ``paths``: the image files in order. ``boxes[i]``: (n, 5) float32 rows ``class cx cy w h``
    normalised to the upright image, or None when image i is unlabelled (feature-only: task losses
    skip it). ``polygons[i]``: its instance polygons (:data:`Polygons`), None when it has none.
    ``names``: contiguous class id -> name. ``source``: what was read (named by messages).
    ``skipped``: (what, why) of entries left out (a label without its image, an unknown category).
    """

    paths: List[Path]
    boxes: List[Optional[np.ndarray]]
    polygons: List[Optional[Polygons]]
    names: Dict[int, str]
    source: str
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.paths) == len(self.boxes) == len(self.polygons):
            raise ValueError("SplitList: paths, boxes and polygons must have one entry per image")


def label_lines(path: Path) -> Iterator[Tuple[str, List[str], np.ndarray]]:
    """(``file:line``, its fields, their float64 values) of each non-empty line of a YOLO label file; a
    non-numeric or non-finite value is an error naming the file and line."""
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        try:
            values = np.array([float(v) for v in parts], np.float64)
        except ValueError:
            raise DatasetError(f"{where}: non-numeric value in {line.strip()[:80]!r}") from None
        if not np.isfinite(values).all():
            raise DatasetError(f"{where}: non-finite value in {line.strip()[:80]!r}")
        yield where, parts, values


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_images(folder: Path) -> List[Path]:
    """Image files under ``folder`` (any depth, suffixes of :data:`IMAGE_SUFFIXES` in any case), sorted by
    relative path."""
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    found = (p for p in folder.rglob("*") if p.is_file() and is_image(p))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def check_unique_ids(paths: Iterable[Path], where: str) -> None:
    """The image id of the rest of vfmkd (caches, labels, logs) is the file's stem: it must be unique."""
    seen: Dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise DatasetError(f"{where}: two images share the id '{p.stem}' (the file name without its extension, "
                               f"the key of caches and logs): {seen[p.stem]} and {p}; rename one")
        seen[p.stem] = p


def warn_skipped(skipped: Sequence[Tuple[str, str]], source: str) -> None:
    """One warning that counts and names what a source left out."""
    if skipped:
        named = "; ".join(f"{what} ({why})" for what, why in skipped[:10])
        more = f"; ... {len(skipped) - 10} more" if len(skipped) > 10 else ""
        LOGGER.warning(f"{source}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'}: {named}{more}")
