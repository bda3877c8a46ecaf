"""A plain ViT student (timm) with ViTDet's simple feature pyramid on its stride-16 tokens."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Sequence, Tuple

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

from vfmkd.core.errors import ConfigError, did_you_mean
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import BACKBONES
from vfmkd.models.backbones.base import BaseBackbone

# timm model names of the variants (patch 16; the pyramid scales assume the 16-pixel token grid).
VIT_VARIANTS: Dict[str, str] = {
    "tiny": "vit_tiny_patch16_224",  # 192 wide, 12 blocks, 5.5M params
    "small": "vit_small_patch16_224",  # 384 wide, 12 blocks, 21.7M
    "base": "vit_base_patch16_224",  # 768 wide, 12 blocks, 85.8M
}
PYRAMID_STRIDES = (4, 8, 16, 32)


def resolve_variant(variant: str) -> str:
    if variant not in VIT_VARIANTS:
        raise ConfigError(f"unknown vit variant '{variant}'.{did_you_mean(variant, VIT_VARIANTS)} "
                          f"Choose from {', '.join(VIT_VARIANTS)}.")
    return VIT_VARIANTS[variant]


def _rescale(dim: int, scale: float) -> Tuple[nn.Module, int]:
    """ViTDet's resampling of the stride-16 map by ``scale`` (4, 2, 1 or 0.5) and its output width."""
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
        ), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, 2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2, 2), dim
    raise ValueError(f"no ViTDet pyramid op for scale {scale}")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet (Li et al. 2022): one stride-16 map -> maps at the requested strides, each resampled
    (deconvolutions up, max-pool down) then 1x1 and 3x3 convolutions to ``out_channels`` with
    LayerNorm, as in detectron2's ``SimpleFeaturePyramid``."""

    def __init__(self, dim: int, patch: int, strides: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.levels = nn.ModuleDict()
        for s in strides:
            resample, width = _rescale(dim, patch / s)
            self.levels[f"P{int(math.log2(s))}"] = nn.Sequential(
                resample,
                nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((name, level(x)) for name, level in self.levels.items())


@BACKBONES.register("vit")
class ViTBackbone(BaseBackbone):
    """timm ViT + simple feature pyramid. ``forward((B, 3, H, W))`` -> ``{"P3": (B, C, H/8, W/8),
    "P4": (B, C, H/16, W/16), "P5": (B, C, H/32, W/32)}`` with ``C = out_channels`` at every level.

    The last block's patch tokens (class/register tokens dropped, final norm applied) come from
    timm's ``forward_intermediates``; the classifier head is pruned. ``img_size`` sizes the learned
    position embedding (its native grid is ``img_size / 16``); any other input size works through
    timm's ``dynamic_img_size`` (position embedding interpolated, inputs padded to a multiple of 16,
    every level cropped back to ``floor(H / stride)``). ``strides`` picks levels from 4/8/16/32.
    """

    def __init__(
        self,
        variant: str = "tiny",
        img_size: int = 224,
        out_channels: int = 256,
        strides: Sequence[int] = (8, 16, 32),
        drop_path_rate: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        strides = [int(s) for s in strides]
        if not strides or sorted(set(strides)) != strides or any(s not in PYRAMID_STRIDES for s in strides):
            raise ConfigError(f"vit strides must be increasing values from {PYRAMID_STRIDES}, got {strides}")
        self.variant = variant
        self.vit = timm.create_model(
            resolve_variant(variant), pretrained=False, img_size=img_size, in_chans=in_channels, num_classes=0,
            dynamic_img_size=True, dynamic_img_pad=True, drop_path_rate=drop_path_rate,
        )
        self.vit.prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)  # keep the final norm
        patch = self.vit.patch_embed.patch_size[0]
        self.pyramid = SimpleFeaturePyramid(self.vit.embed_dim, patch, strides, out_channels)
        self._specs = tuple(FeatureSpec(f"P{int(math.log2(s))}", out_channels, s) for s in strides)

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        tokens = self.vit.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]
        out = self.pyramid(tokens)  # (B, D, ceil(H/16), ceil(W/16)) -> levels
        for spec in self._specs:  # drop the cells of the padding up to a multiple of 16
            out[spec.name] = out[spec.name][..., : h // spec.stride, : w // spec.stride]
        return out
