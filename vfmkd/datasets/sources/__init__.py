"""Data as it comes: one module per source format, each reading a split into a :class:`SplitList`
that :class:`~vfmkd.datasets.coco_yolo.DetectionDataset` consumes (docs/your_data.md).

Formats (``data.format``): ``vfmkd`` (the coco128 folder layout, read by the dataset itself),
``ultralytics`` (a dataset YAML), ``coco`` (an instances JSON), ``images`` (a folder of unlabelled
images); ``auto`` decides from what ``data.root`` is (:func:`detect_format`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from vfmkd.core.errors import ConfigError
from vfmkd.datasets.sources import coco_json, image_folder, ultralytics_yaml
from vfmkd.datasets.sources.split_list import (
    IMAGE_SUFFIXES,
    Polygons,
    SplitList,
    check_unique_ids,
    find_images,
    warn_skipped,
)

#: the values of ``data.format``
FORMATS = ("auto", "vfmkd", "ultralytics", "coco", "images")


def detect_format(root: Path, split: str, json_path: Optional[Path] = None) -> str:
    """The format of ``root``: a .yaml/.yml file is an ultralytics dataset YAML; a COCO JSON given, or
    ``root/annotations/instances_<split>.json``, is COCO; ``root/images/`` is vfmkd's layout;
    any other folder holding images is a folder of unlabelled images; anything else vfmkd's layout."""
    if json_path is not None:
        return "coco"
    if root.is_file() and root.suffix.lower() in ultralytics_yaml.YAML_SUFFIXES:
        return "ultralytics"
    if coco_json.default_json(root, split).is_file():
        return "coco"
    if (root / "images").is_dir() or (root / "object_detection").is_dir():
        return "vfmkd"
    if root.is_dir() and find_images(root):
        return "images"
    return "vfmkd"  # nothing else fits: vfmkd's layout, whose reader names the folder it expected


def open_split(fmt: str, root: Path, split: str, num_classes: int, classes_key: str,
               json_path: Optional[Path] = None) -> Optional[SplitList]:
    """The split ``split`` read by the source of ``fmt`` (``auto``: :func:`detect_format`); None for
    vfmkd's own layout, which :class:`~vfmkd.datasets.coco_yolo.DetectionDataset` reads itself."""
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(root, split, json_path)
    if fmt == "ultralytics":
        return ultralytics_yaml.load_split(root, split, num_classes, classes_key)
    if fmt == "coco":
        return coco_json.load_split(json_path or coco_json.default_json(root, split), root, split, num_classes,
                                    classes_key)
    if fmt == "images":
        return image_folder.load_split(root, split)
    return None


__all__ = ["FORMATS", "IMAGE_SUFFIXES", "Polygons", "SplitList", "check_unique_ids", "detect_format",
           "find_images", "open_split", "warn_skipped"]
