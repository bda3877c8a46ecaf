"""RegNetX / RegNetY students (timm ``features_only`` trunks)."""
from __future__ import annotations

from typing import Sequence

from vfmkd.core.registry import BACKBONES
from vfmkd.models.backbones.repvit import TimmFeaturesBackbone, check_variant

# The mobile-to-small RegNets of Radosavovic et al. 2020 (name = GFLOPs at 224: 002 = 200 MF).
# Y adds squeeze-and-excitation to X.
REGNET_VARIANTS = (
    "regnetx_002", "regnetx_004", "regnetx_006", "regnetx_008", "regnetx_016",
    "regnety_002", "regnety_004", "regnety_006", "regnety_008", "regnety_016",
)


@BACKBONES.register("regnet")
class RegNetBackbone(TimmFeaturesBackbone):
    """RegNet. ``forward((B, 3, H, W))`` -> ``{"P3": (B, C3, H/8, W/8), "P4": ..., "P5": ...}``;
    ``variant`` is a timm RegNet name (:data:`REGNET_VARIANTS`); regnetx_002 gives C3/C4/C5 =
    56/152/368 (read from timm's ``feature_info``). ``strides`` picks levels from 2/4/8/16/32;
    ``drop_path_rate`` is timm's stochastic depth.
    """

    def __init__(
        self,
        variant: str = "regnetx_002",
        strides: Sequence[int] = (8, 16, 32),
        drop_path_rate: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        check_variant("regnet", variant, REGNET_VARIANTS)
        super().__init__(variant, strides, in_channels, drop_path_rate=drop_path_rate)
        self.variant = variant
