"""Datasets: what the student sees (images, views, task targets) and the HDF5 teacher-feature cache
format. Nothing here knows which teachers exist or how a run uses them."""
from vfmkd.datasets.coco_yolo import DetectionDataset, check_images, list_images, load_rgb, parse_labels
from vfmkd.datasets.feature_cache import cache_file, rebuild_command
from vfmkd.datasets.feature_cache_reader import FeatureCacheReader
from vfmkd.datasets.feature_cache_writer import FeatureCacheWriter
from vfmkd.datasets.records import Batch, BatchViews, BoxTargets, DetectionBatch, Sample, ViewGeometry, collate_samples
from vfmkd.datasets.transforms import GeometricAugment, StudentView, letterbox, student_view, transform_boxes

__all__ = [
    "Batch",
    "BatchViews",
    "BoxTargets",
    "DetectionBatch",
    "DetectionDataset",
    "FeatureCacheReader",
    "FeatureCacheWriter",
    "GeometricAugment",
    "Sample",
    "StudentView",
    "ViewGeometry",
    "cache_file",
    "check_images",
    "collate_samples",
    "letterbox",
    "list_images",
    "load_rgb",
    "parse_labels",
    "rebuild_command",
    "student_view",
    "transform_boxes",
]
