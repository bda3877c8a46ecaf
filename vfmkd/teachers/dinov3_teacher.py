"""DINOv3 as frozen teachers, built with timm from Meta's official checkpoints.

* ``dinov3``: the ViTs, patch 16, four registers ("storage tokens"), RoPE: ``variant`` ``vits16`` |
  ``vits16plus`` | ``vitb16`` | ``vitl16`` | ``vith16plus`` (timm ``vit_{small,small_plus,base,large,
  huge_plus}_patch16_dinov3``); default input 224. Features: ``patch_tokens`` ``(B, C, S/16, S/16)``
  after the final LayerNorm (primary) and ``cls_token`` ``(B, C, 1, 1)`` with stride S (the
  :attr:`~vfmkd.teachers.base.BaseTeacher.summary_feature`); registers dropped.
* ``dinov3_convnext``: the distilled ConvNeXts, ``variant`` ``tiny`` | ``small`` | ``base`` | ``large``
  (timm ``convnext_*``); default input 256. Features: ``stage2`` ``(B, C/4, S/8, S/8)``, ``stage3``
  ``(B, C/2, S/16, S/16)``, ``patch_tokens`` ``(B, C, S/32, S/32)`` (the last stage after the final
  LayerNorm, Meta's ``x_norm_patchtokens``; primary) and ``cls_token`` ``(B, C, 1, 1)`` (the final
  LayerNorm of the global average, Meta's ``x_norm_clstoken``).

Meta's files (``dinov3_vits16_pretrain_lvd1689m-08c60483.pth``, ``dinov3_convnext_tiny_pretrain_lvd1689m-
21b726bb.pth``, ...: a plain state_dict; ``storage_tokens``, ``mask_token``, ``rope_embed.periods``,
``blocks.N.ls1.gamma``, fused ``attn.qkv`` with ``bias_mask``; the ConvNeXts ``downsample_layers`` /
``stages.i.j.dwconv``) are loaded with ``weights_only=True`` and converted by timm's own converters
(``timm.models.eva.checkpoint_filter_fn``, ``timm.models.convnext.checkpoint_filter_fn``). The released
S/B/L ViTs carry all-zero qkv biases; timm's models without qkv bias drop them (a non-zero bias is refused,
naming the fix). Preprocessing: :mod:`vfmkd.teachers.timm_teacher` with ImageNet mean/std (Meta's).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import timm
import torch
from timm.models.convnext import checkpoint_filter_fn as convnext_filter_fn
from timm.models.eva import checkpoint_filter_fn as eva_filter_fn
from torch import nn

from vfmkd.core.errors import CheckpointError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.timm_teacher import TimmTeacher, TimmVariant, describe_file, preprocessing_id

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_STAGE3_RE = re.compile(r"^stages\.2\.(?:blocks\.)?(\d+)\.")

#: variant -> timm model; ``plus`` models have a SwiGLU MLP (``mlp.w1`` in Meta's files)
DINOV3_VARIANTS: Dict[str, TimmVariant] = {
    "vits16": TimmVariant("vit_small_patch16_dinov3", 16, 384, 12, 4),
    "vits16plus": TimmVariant("vit_small_plus_patch16_dinov3", 16, 384, 12, 4),
    "vitb16": TimmVariant("vit_base_patch16_dinov3", 16, 768, 12, 4),
    "vitl16": TimmVariant("vit_large_patch16_dinov3", 16, 1024, 24, 4),
    "vith16plus": TimmVariant("vit_huge_plus_patch16_dinov3", 16, 1280, 32, 4),
}
#: ConvNeXt variant -> timm model; ``patch`` is the output stride, ``embed_dim`` the last stage's
#: width, ``depth`` the third stage's blocks (what tells tiny from small)
DINOV3_CONVNEXT_VARIANTS: Dict[str, TimmVariant] = {
    "tiny": TimmVariant("convnext_tiny", 32, 768, 9),
    "small": TimmVariant("convnext_small", 32, 768, 27),
    "base": TimmVariant("convnext_base", 32, 1024, 27),
    "large": TimmVariant("convnext_large", 32, 1536, 27),
}


def _dinov3_eva_filter(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's EVA converter, after dropping the qkv biases a model without them cannot hold (the released
    S/B/L files carry zeros there: timm's ``*_dinov3`` models have none, its ``*_qkvb`` ones have)."""
    if not any(n.endswith("q_bias") for n, _ in model.named_parameters()):
        nonzero = [k for k, v in state_dict.items() if k.endswith("attn.qkv.bias") and bool(v.abs().max() > 0)]
        if nonzero:
            raise CheckpointError(f"this DINOv3 file has non-zero qkv biases ({nonzero[0]}), which timm's "
                                  f"{type(model).__name__} without qkv bias cannot hold; it is not a released "
                                  "DINOv3 backbone (re-save it with zero qkv biases or use the released file).")
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(("attn.qkv.bias", "attn.qkv.bias_mask"))}
    return eva_filter_fn(state_dict, model)


def _refuse(family: str, label: str, source: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    raise CheckpointError(f"{source} is {describe_file(state_dict)}, not a {label} backbone; the {family} teacher "
                          f"needs a {label} file (python tools/download_weights.py --list).")


def _no_size(label: str, source: str, what: str, known: Mapping[str, TimmVariant]) -> CheckpointError:
    names = ", ".join(f"{n} ({v.embed_dim}d, depth {v.depth})" for n, v in known.items())
    return CheckpointError(f"{source} is a {label} of unknown size ({what}); known: {names}.")


@TEACHERS.register("dinov3")
class Dinov3Teacher(TimmTeacher):
    """Frozen DINOv3 ViT (``variant`` vits16 | vits16plus | vitb16 | vitl16 | vith16plus); features
    ``patch_tokens`` (B, C, S/16, S/16) and ``cls_token`` (B, C, 1, 1) with stride S (module doc)."""

    family = "dinov3"
    label = "DINOv3"
    variants = DINOV3_VARIANTS
    default_variant = "vits16"
    mean, std = _MEAN, _STD
    preprocessing = preprocessing_id("dinov3", _MEAN, _STD)
    converter = staticmethod(_dinov3_eva_filter)

    def __init__(self, variant: str = "auto", checkpoint: Optional[str] = None, input_size: int = 224,
                 init: str = "pretrained", dtype: str = "auto", device: str = "auto", seed: int = 0) -> None:
        super().__init__()
        self._build(self.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size, init=init,
                                       dtype=dtype, device=device, seed=seed))

    @classmethod
    def detect_variant(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> str:
        """Meta's layout (``storage_tokens``) or timm's (``reg_token`` + ``gamma_1``)."""
        registers = state_dict.get("storage_tokens", state_dict.get("reg_token"))
        is_dinov3 = "storage_tokens" in state_dict or (registers is not None and "blocks.0.gamma_1" in state_dict)
        if not is_dinov3 or "patch_embed.proj.weight" not in state_dict:
            _refuse(cls.family, "DINOv3 ViT", source, state_dict)
        dim = int(state_dict["patch_embed.proj.weight"].shape[0])
        depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))})
        plus = any(".mlp.w1." in k or ".mlp.fc1_g." in k for k in state_dict)
        for name, v in cls.variants.items():
            if (v.embed_dim, v.depth, name.endswith("plus")) == (dim, depth, plus):
                return name
        raise _no_size("DINOv3 ViT", source, f"embed dim {dim}, depth {depth}, SwiGLU {plus}", cls.variants)


@TEACHERS.register("dinov3_convnext")
class Dinov3ConvNextTeacher(TimmTeacher):
    """Frozen DINOv3 ConvNeXt (``variant`` tiny | small | base | large); features ``stage2`` (B, C/4, S/8,
    S/8), ``stage3`` (B, C/2, S/16, S/16), ``patch_tokens`` (B, C, S/32, S/32) and ``cls_token``
    (B, C, 1, 1) with stride S (module doc)."""

    family = "dinov3_convnext"
    label = "DINOv3 ConvNeXt"
    variants = DINOV3_CONVNEXT_VARIANTS
    default_variant = "tiny"
    mean, std = _MEAN, _STD
    preprocessing = preprocessing_id("dinov3_convnext", _MEAN, _STD)
    converter = staticmethod(convnext_filter_fn)

    def __init__(self, variant: str = "auto", checkpoint: Optional[str] = None, input_size: int = 256,
                 init: str = "pretrained", dtype: str = "auto", device: str = "auto", seed: int = 0) -> None:
        super().__init__()
        self._build(self.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size, init=init,
                                       dtype=dtype, device=device, seed=seed))

    def create_model(self, input_size: int) -> nn.Module:
        return timm.create_model(self.spec.timm_name, pretrained=False, num_classes=0)

    @classmethod
    def detect_variant(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> str:
        """Meta's layout (``downsample_layers``, ``stages.i.j.dwconv``) or timm's (``stem``, ``stages.i.blocks.j``)."""
        first = state_dict.get("downsample_layers.0.0.weight", state_dict.get("stem.0.weight"))
        if first is None or first.ndim != 4:
            _refuse(cls.family, "DINOv3 ConvNeXt", source, state_dict)
        last = state_dict.get("norm.weight", state_dict.get("head.norm.weight"))
        dim = int(last.shape[0]) if last is not None else -1
        depth = len({int(m.group(1)) for k in state_dict if (m := _STAGE3_RE.match(k))})
        for name, v in cls.variants.items():
            if (v.embed_dim, v.depth) == (dim, depth):
                return name
        raise _no_size("DINOv3 ConvNeXt", source, f"last stage {dim} channels, third stage depth {depth}",
                       cls.variants)

    @classmethod
    def _input_multiple(cls, settings) -> Tuple[int, str]:
        return 32, "the ConvNeXt's output stride"

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        c = self.spec.embed_dim
        return (FeatureSpec("stage2", c // 4, 8), FeatureSpec("stage3", c // 2, 16),
                FeatureSpec("patch_tokens", c, 32), FeatureSpec("cls_token", c, self.input_size))

    @torch.no_grad()
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` -> the stage maps, the final-LayerNorm'ed last stage and its pooled token (float32)."""
        self._check_pixels(pixels)
        with self.autocast():
            x = self.model.stem(pixels.to(self.device))
            maps = []
            for stage in self.model.stages:
                x = stage(x)
                maps.append(x)
            head = self.model.head
            tokens = head.norm(maps[-1])  # LayerNorm2d over channels, per location
            cls = head.norm(maps[-1].mean((2, 3), keepdim=True))
        out = {"stage2": maps[1], "stage3": maps[2], "patch_tokens": tokens, "cls_token": cls}
        return {k: v.float().contiguous() for k, v in out.items()}

