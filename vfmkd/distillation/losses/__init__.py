"""Loss families, one file each; importing registers them in LOSSES."""
from vfmkd.distillation.losses.detection import DetectionLoss
from vfmkd.distillation.losses.feature import FeatureDistillLoss, FeatureMSELoss

__all__ = ["DetectionLoss", "FeatureDistillLoss", "FeatureMSELoss"]
