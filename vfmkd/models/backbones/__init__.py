"""Student backbones. Importing this package registers the built-in ones."""
from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.backbones.yolov8 import YOLOv8Backbone

__all__ = ["BaseBackbone", "YOLOv8Backbone"]
