"""Necks fuse backbone levels. Importing this package registers the built-in ones."""
from vfmkd.models.necks.fusion_fpn import FusionFPN
from vfmkd.models.necks.yolov8_pafpn import YOLOv8PAFPN

__all__ = ["FusionFPN", "YOLOv8PAFPN"]
