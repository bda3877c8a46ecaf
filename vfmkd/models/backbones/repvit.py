"""RepViT students (timm), and the shared wrapper for timm ``features_only`` trunks."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, List, Sequence, Tuple

import timm
import torch

from vfmkd.core.errors import ConfigError, did_you_mean
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import BACKBONES
from vfmkd.models.backbones.base import BaseBackbone

# timm's RepViT family (Wang et al. 2024), a mobile CNN with ViT-style block design.
REPVIT_VARIANTS = ("repvit_m0_9", "repvit_m1_0", "repvit_m1_1", "repvit_m1_5", "repvit_m2_3")


def check_variant(kind: str, variant: str, allowed: Iterable[str]) -> None:
    """ConfigError with a did-you-mean and the list unless ``variant`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if variant not in allowed:
        raise ConfigError(f"unknown {kind} variant '{variant}'.{did_you_mean(variant, allowed)} "
                          f"Choose from {', '.join(allowed)}.")


def feature_indices(timm_name: str, strides: Sequence[int], **kwargs) -> List[int]:
    """The ``out_indices`` of a timm model's ``feature_info`` whose reductions are ``strides``.

    The model is built on the meta device only to read its ``feature_info`` (no memory, no init).
    """
    with torch.device("meta"):
        probe = timm.create_model(timm_name, pretrained=False, features_only=True, **kwargs)
    reductions = probe.feature_info.reduction()
    missing = [s for s in strides if s not in reductions]
    if missing:
        raise ConfigError(f"{timm_name} has no feature level at stride(s) {missing}; its levels are at {reductions}")
    return [reductions.index(s) for s in strides]


class TimmFeaturesBackbone(BaseBackbone):
    """A timm trunk built with ``features_only=True`` and the ``out_indices`` at the requested
    strides; timm's ``FeatureListNet`` rebuilds the trunk up to the deepest level (no hooks, no
    unused parameters). Channels and strides are read from its ``feature_info``.

    ``timm_name`` is the name ``timm.create_model`` takes; the registered subclasses take it from
    their ``variant`` key (for RepViT and RegNet the variant names are timm's model names).
    """

    def __init__(self, timm_name: str, strides: Sequence[int], in_channels: int = 3, **timm_kwargs) -> None:
        super().__init__()
        strides = [int(s) for s in strides]
        if not strides or sorted(set(strides)) != strides:
            raise ConfigError(f"{timm_name}: strides must be increasing, got {strides}")
        kwargs = dict(in_chans=in_channels, **timm_kwargs)
        self.timm_name = timm_name
        self.body = timm.create_model(
            timm_name, pretrained=False, features_only=True, out_indices=feature_indices(timm_name, strides, **kwargs),
            **kwargs,
        )
        info = self.body.feature_info
        self._specs = tuple(
            FeatureSpec(f"P{int(math.log2(r))}", c, r) for c, r in zip(info.channels(), info.reduction())
        )

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((spec.name, f) for spec, f in zip(self._specs, self.body(x)))


@BACKBONES.register("repvit")
class RepViTBackbone(TimmFeaturesBackbone):
    """RepViT. ``forward((B, 3, H, W))`` -> ``{"P3": (B, C3, H/8, W/8), "P4": ..., "P5": ...}``;
    ``variant`` is a timm RepViT name (:data:`REPVIT_VARIANTS`); repvit_m0_9 gives C3/C4/C5 =
    96/192/384 (read from timm's ``feature_info``). ``strides`` picks
    levels from 4/8/16/32. (timm's RepViT has no stochastic depth.) For deployment, timm's
    ``timm.utils.reparameterize_model`` fuses the re-parameterisable branches of a trained model.
    """

    def __init__(
        self,
        variant: str = "repvit_m0_9",
        strides: Sequence[int] = (8, 16, 32),
        in_channels: int = 3,
    ) -> None:
        check_variant("repvit", variant, REPVIT_VARIANTS)
        super().__init__(variant, strides, in_channels)
        self.variant = variant
