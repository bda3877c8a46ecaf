"""Loss families, one file each; importing registers them in LOSSES."""
from vfmkd.distillation.losses.affinity import FeatureAffinityLoss
from vfmkd.distillation.losses.detection import DetectionLoss
from vfmkd.distillation.losses.feature import FeatureCosineLoss, FeatureDistillLoss, FeatureMSELoss, FeatureSmoothL1Loss
from vfmkd.distillation.losses.kd import ClsDistillLoss, KLDivergenceLoss, MaskDistillLoss, OutputDistillLoss
from vfmkd.distillation.losses.promptable import EmbeddingDistillLoss, PromptDistillLoss
from vfmkd.distillation.losses.query_panoptic import QueryPanopticLoss
from vfmkd.distillation.losses.rtdetr import RTDETRDetectionLoss
from vfmkd.distillation.losses.segmentation import (
    BinarySegmentationLoss,
    InstanceSegmentationLoss,
    SemanticSegmentationLoss,
)
from vfmkd.distillation.losses.summary import SummaryDistillLoss
from vfmkd.distillation.losses.ultralytics_loss import UltralyticsTaskLoss

__all__ = [
    "BinarySegmentationLoss",
    "ClsDistillLoss",
    "DetectionLoss",
    "EmbeddingDistillLoss",
    "FeatureAffinityLoss",
    "FeatureCosineLoss",
    "FeatureDistillLoss",
    "FeatureMSELoss",
    "FeatureSmoothL1Loss",
    "InstanceSegmentationLoss",
    "KLDivergenceLoss",
    "MaskDistillLoss",
    "OutputDistillLoss",
    "PromptDistillLoss",
    "QueryPanopticLoss",
    "RTDETRDetectionLoss",
    "SemanticSegmentationLoss",
    "SummaryDistillLoss",
    "UltralyticsTaskLoss",
]
