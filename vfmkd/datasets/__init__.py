"""Datasets: what the student sees (images, views, task targets). Nothing here knows which teachers
exist or how a run uses them (their cache is :mod:`vfmkd.cache`)."""
from vfmkd.datasets.coco_yolo import DetectionDataset, parse_labels
from vfmkd.datasets.image_files import check_images, list_images, load_rgb
from vfmkd.datasets.records import Batch, BatchViews, BoxTargets, DetectionBatch, Sample, ViewGeometry, collate_samples
from vfmkd.datasets.transforms import GeometricAugment, StudentView, letterbox, student_view, transform_boxes

__all__ = [
    "Batch",
    "BatchViews",
    "BoxTargets",
    "DetectionBatch",
    "DetectionDataset",
    "GeometricAugment",
    "Sample",
    "StudentView",
    "ViewGeometry",
    "check_images",
    "collate_samples",
    "letterbox",
    "list_images",
    "load_rgb",
    "parse_labels",
    "student_view",
    "transform_boxes",
]
