"""Student backbones. Importing this package registers the built-in ones."""
from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.backbones.mamba import MambaBackbone
from vfmkd.models.backbones.regnet import RegNetBackbone
from vfmkd.models.backbones.repvit import RepViTBackbone
from vfmkd.models.backbones.vit import ViTBackbone
from vfmkd.models.backbones.yolov8 import YOLOv8Backbone

__all__ = ["BaseBackbone", "MambaBackbone", "RegNetBackbone", "RepViTBackbone", "ViTBackbone", "YOLOv8Backbone"]
