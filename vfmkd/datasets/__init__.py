"""Datasets: YOLO-format detection data and the HDF5 teacher-feature cache."""
from vfmkd.datasets.coco_yolo import (
    DetectionDataset,
    check_images,
    collate_detection,
    list_images,
    load_rgb,
    parse_labels,
)
from vfmkd.datasets.transforms import GeometricAugment, StudentView, letterbox, student_view, transform_boxes
from vfmkd.datasets.feature_cache import FeatureCacheReader, FeatureCacheWriter, cache_file, rebuild_command

__all__ = [
    "DetectionDataset",
    "FeatureCacheReader",
    "FeatureCacheWriter",
    "GeometricAugment",
    "StudentView",
    "cache_file",
    "check_images",
    "collate_detection",
    "letterbox",
    "list_images",
    "load_rgb",
    "parse_labels",
    "rebuild_command",
    "student_view",
    "transform_boxes",
]
