"""Task heads. Importing this package registers the built-in ones."""
from vfmkd.models.heads.yolo_head import YOLOv8DetectHead

__all__ = ["YOLOv8DetectHead"]
