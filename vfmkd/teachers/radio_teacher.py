"""NVIDIA's C-RADIO (v3, v4) agglomerative ViTs as frozen teachers, built with timm.

``variant``: ``c-radio_v3-b`` | ``c-radio_v3-l`` | ``c-radio_v3-h`` | ``c-radio_v3-g`` | ``c-radio_v4-so400m``
| ``c-radio_v4-h`` (timm ``vit_{base,large,huge,giant}_patch16_radio_v3``, ``vit_{so400m,huge}_patch16_radio_v4``);
default input 512 (the release's), any multiple of 16.

Weights: NVIDIA's Hugging Face release (``nvidia/C-RADIOv3-B`` ... ``model.safetensors``, renamed
``c-radio_v3-b.safetensors`` etc. by the downloader), whose keys are ``radio_model.model.*`` (the ViT:
``patch_generator.embedder.weight`` a bias-free linear patch projection, ``patch_generator.pos_embed`` the
128 x 128 CPE grid, ``patch_generator.cls_token.token`` the per-teacher CLS tokens followed by the
registers, ``blocks.*``), ``radio_model.input_conditioner.*`` and ``radio_model.summary_idxs``. timm's own
converter (``timm.models.vision_transformer.checkpoint_filter_fn`` -> ``_convert_radio``) maps them onto
timm's ViT and resamples the CPE grid to ``input_size / 16`` (bilinear, RADIO's inference rule), so at a
square input the timm model computes what RADIO computes. ``.pth`` files of the same state_dict load too.

Preprocessing: :mod:`vfmkd.teachers.timm_teacher` with the CLIP mean/std of RADIO's input conditioner.
Features (the ViT's output tokens; RADIO has no final norm): ``patch_tokens`` ``(B, C, S/16, S/16)`` (RADIO's
"spatial features"; primary) and ``summary`` ``(B, k * C, 1, 1)`` with stride S, RADIO's summary: the CLS
tokens at ``summary_idxs`` (read from the file, else ``teacher.summary_tokens``, default ``[0]``)
concatenated, the :attr:`~vfmkd.teachers.base.BaseTeacher.summary_feature`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models.vision_transformer import checkpoint_filter_fn

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.timm_teacher import TimmTeacher, TimmVariant, describe_file, preprocessing_id

_MEAN = tuple(float(v) for v in OPENAI_CLIP_MEAN)
_STD = tuple(float(v) for v in OPENAI_CLIP_STD)
PREFIX = "radio_model.model."
EMBEDDER = PREFIX + "patch_generator.embedder.weight"
TOKENS = PREFIX + "patch_generator.cls_token.token"
SUMMARY_IDXS = "radio_model.summary_idxs"

#: variant -> timm model; ``registers`` = prefix tokens after the first CLS (the other CLS tokens + registers)
RADIO_VARIANTS: Dict[str, TimmVariant] = {
    "c-radio_v3-b": TimmVariant("vit_base_patch16_radio_v3", 16, 768, 12, 7),
    "c-radio_v3-l": TimmVariant("vit_large_patch16_radio_v3", 16, 1024, 24, 7),
    "c-radio_v3-h": TimmVariant("vit_huge_patch16_radio_v3", 16, 1280, 32, 7),
    "c-radio_v3-g": TimmVariant("vit_giant_patch16_radio_v3", 16, 1536, 40, 7),
    "c-radio_v4-so400m": TimmVariant("vit_so400m_patch16_radio_v4", 16, 1152, 27, 9),
    "c-radio_v4-h": TimmVariant("vit_huge_patch16_radio_v4", 16, 1280, 32, 9),
}


def _radio_filter(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """timm's converter with RADIO's resampling rule (bilinear, no antialias, the variant's align_corners:
    what ``timm.create_model(..., pretrained=True)`` passes for these models)."""
    align = any(n in model.pretrained_cfg.get("architecture", "") for n in ("base_patch16_radio_v3",
                                                                          "huge_patch16_radio_v3"))
    return checkpoint_filter_fn(state_dict, model, interpolation="bilinear", antialias=False, align_corners=align)


@TEACHERS.register("radio")
class RadioTeacher(TimmTeacher):
    """Frozen C-RADIO ViT (``variant`` c-radio_v3-b/l/h/g, c-radio_v4-so400m/h); features ``patch_tokens``
    (B, C, S/16, S/16) and ``summary`` (B, k*C, 1, 1) with stride S (see the module doc)."""

    family = "radio"
    label = "C-RADIO"
    variants = RADIO_VARIANTS
    default_variant = "c-radio_v3-b"
    summary_feature = "summary"
    mean, std = _MEAN, _STD
    preprocessing = preprocessing_id("radio", _MEAN, _STD)
    converter = staticmethod(_radio_filter)

    def __init__(self, variant: str = "auto", checkpoint: Optional[str] = None, input_size: int = 512,
                 init: str = "pretrained", dtype: str = "auto", device: str = "auto", seed: int = 0,
                 summary_tokens: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        settings = self.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size, init=init,
                                      dtype=dtype, device=device, seed=seed, summary_tokens=summary_tokens)
        self._file_summary: Optional[Tuple[int, ...]] = None
        self._build(settings)
        chosen = self._file_summary or tuple(settings.extra.get("summary_tokens") or (0,))
        prefix = self.model.num_prefix_tokens
        if any(not 0 <= i < prefix for i in chosen):
            raise ConfigError(f"teacher.summary_tokens={list(chosen)}: {variant} has {prefix} prefix tokens "
                              f"(CLS tokens, then registers); pick indices in [0, {prefix - 1}].")
        self.summary_idxs = chosen

    @classmethod
    def _fingerprint(cls, settings, weights_id: str):
        """The shared fingerprint; chosen ``summary_tokens`` change the cached ``summary`` map, so they are in it."""
        fp = super()._fingerprint(settings, weights_id)
        tokens = settings.extra.get("summary_tokens")
        if tokens is None:
            return fp
        return replace(fp, preprocessing=f"{fp.preprocessing},summary_tokens={'/'.join(map(str, tokens))}")

    def check_file(self, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
        super().check_file(state_dict, path)
        if SUMMARY_IDXS in state_dict:
            self._file_summary = tuple(int(i) for i in state_dict[SUMMARY_IDXS].view(-1).tolist())

    @classmethod
    def detect_variant(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> str:
        """NVIDIA's layout: width from the patch projection, depth from the blocks, v3/v4 from the token table."""
        if EMBEDDER not in state_dict or TOKENS not in state_dict:
            raise CheckpointError(f"{source} is {describe_file(state_dict)}, not a C-RADIO backbone in NVIDIA's "
                                  "layout (radio_model.model.*); the radio teacher needs an official C-RADIO file "
                                  "(python tools/download_weights.py --list).")
        dim = int(state_dict[EMBEDDER].shape[0])
        depth = len({k[len(PREFIX):].split(".")[1] for k in state_dict if k.startswith(PREFIX + "blocks.")})
        registers = int(state_dict[TOKENS].shape[0]) - 1
        for name, v in cls.variants.items():
            if (v.embed_dim, v.depth, v.registers) == (dim, depth, registers):
                return name
        known = ", ".join(f"{n} ({v.embed_dim}d, depth {v.depth}, {v.registers + 1} prefix tokens)"
                          for n, v in cls.variants.items())
        raise CheckpointError(f"{source} is a C-RADIO of unknown size (embed dim {dim}, depth {depth}, "
                              f"{registers + 1} prefix tokens); known: {known}.")

    def summary_channels(self) -> int:
        return self.spec.embed_dim * len(self.summary_idxs)

    def summary_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """RADIO's summary: the CLS tokens at ``summary_idxs``, concatenated -> (B, k * C)."""
        return tokens[:, list(self.summary_idxs)].flatten(1)
