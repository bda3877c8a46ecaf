"""Meta's Perception Encoder (PE-core, the CLIP-aligned ViTs) as a frozen teacher, built with timm.

``variant``: ``tiny16`` | ``small16`` | ``base16`` | ``large14`` | ``gigantic14`` (timm
``vit_pe_core_{tiny,small}_patch16_384``, ``vit_pe_core_base_patch16_224``, ``vit_pe_core_large_patch14_336``,
``vit_pe_core_gigantic_patch14_448``); default input 384, any multiple of the patch.

Weights: Meta's ``PE-Core-T16-384.pt`` ... (the CLIP model: ``visual.conv1``, ``visual.class_embedding``,
``visual.positional_embedding``, ``visual.transformer.resblocks.N.*`` (``in_proj_*``, ``out_proj``,
``mlp.c_fc/c_proj``), ``visual.attn_pool.*``, ``visual.proj``; the text tower is ignored), converted by
timm's own ``_convert_pe`` (through ``timm.models.eva.checkpoint_filter_fn``); the absolute position embedding is
then resampled (bicubic) from the file's grid to ``input_size / patch``, which timm's PE converter does not do.

Preprocessing: :mod:`vfmkd.teachers.timm_teacher` with PE's mean/std (0.5). Features: ``patch_tokens``
``(B, C, S/p, S/p)`` after ``ln_post`` (primary) and ``summary`` ``(B, D, 1, 1)`` with stride S: the
attention-pooled, projected CLIP image embedding (``D`` = 512 / 512 / 1024 / 1024 / 1280), the
:attr:`~vfmkd.teachers.base.BaseTeacher.summary_feature`.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.eva import checkpoint_filter_fn
from torch import nn

from vfmkd.core.errors import CheckpointError
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.timm_teacher import TimmTeacher, TimmVariant, describe_file, preprocessing_id

_MEAN = (0.5, 0.5, 0.5)
_STD = (0.5, 0.5, 0.5)
PATCH = "visual.conv1.weight"
_BLOCK_RE = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")

PE_VARIANTS: Dict[str, TimmVariant] = {
    "tiny16": TimmVariant("vit_pe_core_tiny_patch16_384", 16, 192, 12),
    "small16": TimmVariant("vit_pe_core_small_patch16_384", 16, 384, 12),
    "base16": TimmVariant("vit_pe_core_base_patch16_224", 16, 768, 12),
    "large14": TimmVariant("vit_pe_core_large_patch14_336", 14, 1024, 24),
    "gigantic14": TimmVariant("vit_pe_core_gigantic_patch14_448", 14, 1536, 50),
}
#: the CLIP projection's width per variant (timm's pretrained ``num_classes``)
EMBED_DIMS = {"tiny16": 512, "small16": 512, "base16": 1024, "large14": 1024, "gigantic14": 1280}


def _pe_filter(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's PE converter, then the position embedding resampled to the model's grid (class position kept)."""
    out = checkpoint_filter_fn(state_dict, model)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size, num_prefix_tokens=1,
                                                  interpolation="bicubic", antialias=True, verbose=False)
    return out


@TEACHERS.register("pe_core")
class PeCoreTeacher(TimmTeacher):
    """Frozen PE-core ViT (``variant`` tiny16 | small16 | base16 | large14 | gigantic14); features
    ``patch_tokens`` (B, C, S/p, S/p) and ``summary`` (B, D, 1, 1) with stride S (see the module doc)."""

    family = "pe_core"
    label = "PE-core"
    variants = PE_VARIANTS
    default_variant = "tiny16"
    summary_feature = "summary"
    mean, std = _MEAN, _STD
    preprocessing = preprocessing_id("pe_core", _MEAN, _STD)
    converter = staticmethod(_pe_filter)

    def __init__(self, variant: str = "auto", checkpoint: Optional[str] = None, input_size: int = 384,
                 init: str = "pretrained", dtype: str = "auto", device: str = "auto", seed: int = 0) -> None:
        super().__init__()
        self._build(self.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size, init=init,
                                       dtype=dtype, device=device, seed=seed))

    def create_model(self, input_size: int) -> nn.Module:
        # with its CLIP projection as the head: the summary is the embedding PE aligns with text
        return timm.create_model(self.spec.timm_name, pretrained=False, num_classes=EMBED_DIMS[self.variant],
                                 img_size=input_size)

    @classmethod
    def detect_variant(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> str:
        """Meta's layout: width and patch from ``visual.conv1``, depth from the residual blocks."""
        if PATCH not in state_dict or "visual.attn_pool.probe" not in state_dict:
            raise CheckpointError(f"{source} is {describe_file(state_dict)}, not a PE-core CLIP checkpoint in Meta's "
                                  "layout (visual.conv1, visual.attn_pool); the pe_core teacher needs PE-Core-*.pt.")
        weight = state_dict[PATCH]
        dim, patch = int(weight.shape[0]), int(weight.shape[-1])
        depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))})
        for name, v in cls.variants.items():
            if (v.embed_dim, v.depth, v.patch) == (dim, depth, patch):
                return name
        known = ", ".join(f"{n} ({v.embed_dim}d, depth {v.depth}, patch {v.patch})" for n, v in cls.variants.items())
        raise CheckpointError(f"{source} is a PE-core of unknown size (embed dim {dim}, depth {depth}, patch {patch}); "
                              f"known: {known}.")

    def summary_channels(self) -> int:
        return EMBED_DIMS[self.variant]

    @torch.no_grad()
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` -> {"patch_tokens": (B, C, S/p, S/p), "summary": (B, D, 1, 1)}, float32."""
        self._check_pixels(pixels)
        grid = self.input_size // self.spec.patch
        with self.autocast():
            tokens = self.model.forward_features(pixels.to(self.device))  # (B, 1 + grid^2, C), after ln_post
            summary = self.model.forward_head(tokens)  # attention pool, then the CLIP projection
        tokens, b, c = tokens.float(), tokens.shape[0], tokens.shape[-1]
        patches = tokens[:, self.model.num_prefix_tokens:]
        return {"patch_tokens": patches.reshape(b, grid, grid, c).permute(0, 3, 1, 2).contiguous(),
                "summary": summary.float().reshape(b, -1, 1, 1).contiguous()}

    @classmethod
    def _input_multiple(cls, settings) -> Tuple[int, str]:
        return cls.variants[settings.variant].patch, f"PE-core {settings.variant}'s patch size"
