"""Datasets: YOLO-format detection data and the HDF5 teacher-feature cache."""
from vfmkd.datasets.coco_yolo import (
    DetectionDataset,
    check_images,
    collate_detection,
    letterbox,
    list_images,
    load_rgb,
    parse_labels,
)
from vfmkd.datasets.feature_cache import FeatureCacheReader, FeatureCacheWriter, cache_file, rebuild_command

__all__ = [
    "DetectionDataset",
    "FeatureCacheReader",
    "FeatureCacheWriter",
    "cache_file",
    "check_images",
    "collate_detection",
    "letterbox",
    "list_images",
    "load_rgb",
    "parse_labels",
    "rebuild_command",
]
