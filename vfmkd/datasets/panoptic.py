"""COCO panoptic ground truth of the coco128 layout, read per image at its original resolution.

Layout: ``root/panoptic_segmentation/config.yaml`` names, per split entry (``train``/``val``), the
``annotations`` JSON and the ``masks`` folder of segment PNGs (paths relative to the config's
folder). The JSON is standard COCO panoptic: ``categories`` (id, name, isthing), ``images`` (id,
file_name, height, width), ``annotations`` (image_id, file_name of the PNG, ``segments_info``: id,
category_id, iscrowd, area, bbox). A PNG is RGB; a pixel's segment id is R + 256 G + 256² B, 0 =
void (unlabeled).

The image id of the rest of vfmkd is the image file's stem (``000000000139``); the JSON's integer
``image_id`` is looked up through its ``images`` table.

An annotation that contradicts itself (a ``segments_info`` id absent from the PNG, a PNG id without
``segments_info``, an unknown category, a PNG of the wrong size or mode, a missing PNG) raises
:class:`PanopticAnnotationError` with the reason; the scorer skips that image, counts it and names it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

import numpy as np
import yaml

from vfmkd.core.errors import DatasetError
from vfmkd.datasets.image_files import pil_open
from vfmkd.datasets.masks import SemanticClassTable

PANOPTIC_DIR = "panoptic_segmentation"
VOID = 0  # segment id (and category id) of unlabeled pixels


class PanopticAnnotationError(DatasetError):
    """One image's panoptic annotation is inconsistent; ``image_id`` and ``reason`` say how."""

    def __init__(self, image_id: str, reason: str) -> None:
        super().__init__(f"panoptic annotation of image {image_id}: {reason}")
        self.image_id, self.reason = image_id, reason


@dataclass(frozen=True)
class PanopticCategory:
    id: int
    name: str
    isthing: bool


@dataclass(frozen=True)
class PanopticSegment:
    """One ground-truth segment: its id in the PNG, category, thing or stuff, crowd flag and the
    ``area`` the JSON states (the PNG's pixel count is ``PanopticTarget.areas()``)."""

    id: int
    category_id: int
    isthing: bool
    iscrowd: bool
    area: int


@dataclass
class PanopticTarget:
    """The panoptic ground truth of one image at its original (h, w): ``ids`` (h, w) int64 segment
    id per pixel (0 = void) and ``segments`` by id."""

    image_id: str
    ids: np.ndarray
    segments: Dict[int, PanopticSegment]

    def areas(self) -> Dict[int, int]:
        """Pixel count of every segment id in the PNG (void left out)."""
        values, counts = np.unique(self.ids, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts) if v != VOID}

    def category_map(self, crowd_as_void: bool = False) -> np.ndarray:
        """(h, w) int64 category id per pixel, 0 = void (and crowd segments with ``crowd_as_void``)."""
        seg_ids = np.array([VOID, *self.segments], np.int64)
        cats = np.array([VOID, *(0 if crowd_as_void and s.iscrowd else s.category_id for s in self.segments.values())],
                        np.int64)
        order = np.argsort(seg_ids)
        pos = np.searchsorted(seg_ids[order], self.ids)  # every PNG id is a segment id (checked at load)
        return cats[order][pos]

    def semantic_index(self, table: SemanticClassTable) -> np.ndarray:
        """(h, w) uint16 contiguous semantic class index (``masks.SemanticClassTable``: position in
        the semantic config's sorted ids, 0 = unlabeled); a category the table lacks is an error."""
        return table.encode(self.category_map(), Path(f"panoptic PNG of {self.image_id}"))

    def metric_input(self, crowd_as_void: bool = True) -> np.ndarray:
        """(h, w, 2) int64 ``(category id, segment id)`` per pixel, torchmetrics' ``PanopticQuality``
        layout; void (and, by default, crowd) pixels get category 0, which the metric treats as void."""
        cats = self.category_map(crowd_as_void)
        return np.stack([cats, np.where(cats == VOID, 0, self.ids)], -1)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 COCO panoptic PNG -> (h, w) int64 segment ids (R + 256 G + 256² B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _split_entry(config: Mapping[str, Any], split: str, source: Path) -> Mapping[str, Any]:
    """The config entry of ``split``: key == split, or the entry whose images/masks folder or JSON
    is named after it (``val`` for ``val2017``)."""
    if isinstance(config.get(split), Mapping):
        return config[split]
    for entry in config.values():
        if not isinstance(entry, Mapping):
            continue
        names = ({Path(str(entry.get(k, ""))).name for k in ("images", "masks")}
                 | {Path(str(entry.get("annotations", ""))).stem})
        if split in names or f"panoptic_{split}" in names:
            return entry
    listed = [k for k, v in config.items() if isinstance(v, Mapping)]
    raise DatasetError(f"{source} has no entry for split '{split}' (entries: {', '.join(listed) or 'none'}; an entry "
                       f"is matched by its key or by its images/masks folder name)")


class PanopticAnnotations:
    """The panoptic annotations of one split: categories, and each image's segments (``load``)."""

    def __init__(self, root: str | Path, split: str) -> None:
        self.root, self.split = Path(root), split
        folder = self.root / PANOPTIC_DIR
        self.source = folder / "config.yaml"
        if not self.source.is_file():
            raise DatasetError(f"no panoptic annotations: {self.source} not found (expected {PANOPTIC_DIR}/config.yaml "
                               f"naming each split's annotations JSON and masks folder)")
        try:
            config = yaml.safe_load(self.source.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise DatasetError(f"{self.source} is not valid YAML: {exc}") from None
        entry = _split_entry(config if isinstance(config, Mapping) else {}, split, self.source)
        for key in ("annotations", "masks"):
            if not entry.get(key):
                raise DatasetError(f"{self.source}: the entry of split '{split}' has no '{key}:' path")
        self.json_path, self.mask_dir = folder / str(entry["annotations"]), folder / str(entry["masks"])
        if not self.json_path.is_file():
            raise DatasetError(f"panoptic annotations {self.json_path} (split '{split}' of {self.source}) not found")
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{self.json_path} is not valid JSON: {exc}") from None
        try:
            self.categories: Dict[int, PanopticCategory] = {
                int(c["id"]): PanopticCategory(int(c["id"]), str(c["name"]),
                                               bool(c["isthing"])) for c in data["categories"]}
            stems = {int(im["id"]): (Path(str(im["file_name"])).stem, (int(im["height"]), int(im["width"])))
                     for im in data["images"]}
            self._annotations: Dict[str, Tuple[Mapping[str, Any], Optional[Tuple[int, int]]]] = {}
            for ann in data["annotations"]:
                stem, hw = stems.get(int(ann["image_id"]), (Path(str(ann["file_name"])).stem, None))
                self._annotations[stem] = (ann, hw)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{self.json_path} is not a COCO panoptic file (categories, images, annotations with "
                               f"image_id, file_name, segments_info): {type(exc).__name__}: {exc}") from None
        if VOID in self.categories:
            raise DatasetError(f"{self.json_path}: category id {VOID} is reserved for void (unlabeled) pixels")

    @property
    def things(self) -> FrozenSet[int]:
        return frozenset(c.id for c in self.categories.values() if c.isthing)

    @property
    def stuffs(self) -> FrozenSet[int]:
        return frozenset(c.id for c in self.categories.values() if not c.isthing)

    @property
    def names(self) -> Dict[int, str]:
        return {c.id: c.name for c in self.categories.values()}

    def image_ids(self) -> List[str]:
        return sorted(self._annotations)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._annotations

    def __len__(self) -> int:
        return len(self._annotations)

    def load(self, image_id: str) -> PanopticTarget:
        """The ground truth of ``image_id`` (an image file stem); raises :class:`PanopticAnnotationError`
        when the annotation is inconsistent and ``KeyError`` when the image has none."""
        ann, hw = self._annotations[image_id]

        def bad(reason: str) -> PanopticAnnotationError:
            return PanopticAnnotationError(image_id, reason)

        segments: Dict[int, PanopticSegment] = {}
        for s in ann.get("segments_info") or []:
            try:
                sid, cat = int(s["id"]), int(s["category_id"])
                seg = PanopticSegment(sid, cat, False, bool(s.get("iscrowd", 0)), int(s.get("area", -1)))
            except (KeyError, TypeError, ValueError):
                raise bad(f"a segments_info entry without integer id/category_id: {s!r:.120}") from None
            if sid == VOID:
                raise bad(f"segments_info id {VOID} is the void id")
            if sid in segments:
                raise bad(f"segments_info lists segment id {sid} twice")
            if cat not in self.categories:
                raise bad(f"segment {sid} has category_id {cat}, not a category of {self.json_path.name}")
            segments[sid] = PanopticSegment(sid, cat, self.categories[cat].isthing, seg.iscrowd, seg.area)
        png = self.mask_dir / str(ann.get("file_name", f"{image_id}.png"))
        if not png.is_file():
            raise bad(f"segment PNG {png} not found")
        try:
            with pil_open()(png) as im:
                if im.mode not in ("RGB", "RGBA"):
                    raise bad(f"{png.name} has mode {im.mode}: expected an RGB PNG (id = R + 256 G + 256² B)")
                rgb = np.asarray(im.convert("RGB"))
        except PanopticAnnotationError:
            raise
        except Exception as exc:  # PIL: OSError, SyntaxError, ValueError, ...
            raise bad(f"{png.name} cannot be decoded ({type(exc).__name__}: {exc})") from None
        if hw is not None and rgb.shape[:2] != hw:
            raise bad(f"{png.name} is {rgb.shape[1]}x{rgb.shape[0]} (w x h) but the JSON's image is {hw[1]}x{hw[0]}")
        ids = rgb_to_id(rgb)
        present = set(np.unique(ids).tolist()) - {VOID}
        missing = sorted(set(segments) - present)
        if missing:
            raise bad(f"segments_info id(s) {missing[:10]} missing from the PNG {png.name}")
        unlisted = sorted(present - set(segments))
        if unlisted:
            raise bad(f"PNG {png.name} has segment id(s) {unlisted[:10]} without a segments_info entry")
        return PanopticTarget(image_id, ids, segments)
