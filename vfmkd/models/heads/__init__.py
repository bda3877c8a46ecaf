"""Task heads. Importing this package registers the built-in ones. Each head is a :class:`BaseHead`
whose ``task`` attribute names its task in :data:`~vfmkd.core.registry.TASKS`; the task
(``vfmkd.tasks.task_of(head)``) says which targets, losses, metrics and output distillation it pairs with."""
from vfmkd.models.heads.base import BaseHead
from vfmkd.models.heads.binary_head import BinaryHead
from vfmkd.models.heads.rapsam_head import RapSAMHead
from vfmkd.models.heads.rtdetr_head import RTDETRHead
from vfmkd.models.heads.sam_decoder_head import SamDecoderHead
from vfmkd.models.heads.semantic_head import FPNFusion, SemanticHead
from vfmkd.models.heads.yolo_head import YOLOv8DetectHead
from vfmkd.models.heads.yolo_seg_head import YOLOv8SegmentHead

__all__ = ["BaseHead", "BinaryHead", "FPNFusion", "RapSAMHead", "SamDecoderHead", "RTDETRHead", "SemanticHead",
           "YOLOv8DetectHead", "YOLOv8SegmentHead"]
