"""DINO (v1) and DINOv2 ViTs as frozen teachers, built with timm from Meta's official checkpoints.

Two registered teachers share one implementation:

* ``dino``: DINO v1, ``variant`` ``vits16`` | ``vitb16`` | ``vits8`` | ``vitb8`` (default input 224);
* ``dinov2``: DINOv2, ``variant`` ``vits14`` | ``vitb14`` | ``vitl14`` | ``vitg14``, each also with
  four registers (``vits14_reg4`` …) (default input 518).

The network is timm's VisionTransformer (``vit_small_patch16_224``, ``vit_small_patch14_dinov2``,
``vit_small_patch14_reg4_dinov2``, …, see :data:`DINO_VARIANTS` / :data:`DINOV2_VARIANTS`). The official
``.pth`` files (``dino_deitsmall16_pretrain.pth``, ``dinov2_vits14_pretrain.pth``,
``dinov2_vits14_reg4_pretrain.pth``, …) are loaded with :func:`vfmkd.utils.checkpoint.load_checkpoint`
(``weights_only=True``) and converted to timm's layout by timm's own
``timm.models.vision_transformer.checkpoint_filter_fn``: for DINOv2 it drops ``mask_token``, folds the
class token's position embedding into ``cls_token`` and renames ``register_tokens`` for the register
models, renames the SwiGLU ``w12``/``w3`` of ViT-g; for every file it resamples ``pos_embed``
(bicubic, antialiased) from the checkpoint's grid to ``input_size / patch``. DINO v1 files already use
timm's key names. The variant of a file is recognised from its tensor shapes before anything is
loaded into the model.

Preprocessing and features: :mod:`vfmkd.teachers.timm_teacher` (ImageNet mean/std; ``patch_tokens``
``(B, C, S/p, S/p)`` after the final LayerNorm, the primary feature, and ``cls_token`` ``(B, C, 1, 1)``
with stride ``S``, the :attr:`~vfmkd.teachers.base.BaseTeacher.summary_feature`).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import checkpoint_filter_fn

from vfmkd.core.errors import CheckpointError
from vfmkd.core.official_weights import weights_for
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.timm_teacher import TimmTeacher, TimmVariant, preprocessing_id

logger = logging.getLogger("vfmkd")


DinoVariant = TimmVariant  # the name this module's users know

DINO_VARIANTS: Dict[str, DinoVariant] = {
    "vits16": DinoVariant("vit_small_patch16_224", 16, 384, 12),
    "vitb16": DinoVariant("vit_base_patch16_224", 16, 768, 12),
    "vits8": DinoVariant("vit_small_patch8_224", 8, 384, 12),
    "vitb8": DinoVariant("vit_base_patch8_224", 8, 768, 12),
}
DINOV2_VARIANTS: Dict[str, DinoVariant] = {
    "vits14": DinoVariant("vit_small_patch14_dinov2", 14, 384, 12),
    "vitb14": DinoVariant("vit_base_patch14_dinov2", 14, 768, 12),
    "vitl14": DinoVariant("vit_large_patch14_dinov2", 14, 1024, 24),
    "vitg14": DinoVariant("vit_giant_patch14_dinov2", 14, 1536, 40),
    "vits14_reg4": DinoVariant("vit_small_patch14_reg4_dinov2", 14, 384, 12, 4),
    "vitb14_reg4": DinoVariant("vit_base_patch14_reg4_dinov2", 14, 768, 12, 4),
    "vitl14_reg4": DinoVariant("vit_large_patch14_reg4_dinov2", 14, 1024, 24, 4),
    "vitg14_reg4": DinoVariant("vit_giant_patch14_reg4_dinov2", 14, 1536, 40, 4),
}
FAMILIES: Dict[str, Dict[str, DinoVariant]] = {"dino": DINO_VARIANTS, "dinov2": DINOV2_VARIANTS}
_FAMILY_NAMES = {"dino": "DINO", "dinov2": "DINOv2"}
_MEAN = tuple(float(v) for v in IMAGENET_DEFAULT_MEAN)
_STD = tuple(float(v) for v in IMAGENET_DEFAULT_STD)
_PATCH_KEY = "patch_embed.proj.weight"
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def describe_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> Tuple[str, int, int, int, int]:
    """(family, embed dim, depth, patch size, registers) of a DINO/DINOv2 ViT state_dict, from its keys
    and tensor shapes only. Accepts Meta's official layout and timm's. DINOv2 is recognised by its
    ``mask_token`` or LayerScale (``ls1.gamma``) tensors, which DINO v1 does not have."""
    if _PATCH_KEY not in state_dict or "cls_token" not in state_dict:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(
            f"{source} is not a DINO/DINOv2 ViT state_dict: it has no '{_PATCH_KEY}' / 'cls_token' (first keys: "
            f"{sample}). Use an official backbone checkpoint (python tools/download_weights.py --list)."
        )
    if any(re.match(r"^blocks\.\d+\.\d+\.", k) for k in state_dict):
        raise CheckpointError(
            f"{source} stores its blocks in chunks (blocks.<chunk>.<block>.*, a DINOv2 training checkpoint); "
            "use the released backbone file (python tools/download_weights.py --list) or re-save the "
            "backbone with plain blocks.<i>.* keys."
        )
    weight = state_dict[_PATCH_KEY]
    dim, patch = int(weight.shape[0]), int(weight.shape[-1]) if weight.ndim == 4 else -1
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))})
    reg = state_dict.get("register_tokens", state_dict.get("reg_token"))
    registers = int(reg.shape[1]) if reg is not None else 0
    is_v2 = "mask_token" in state_dict or any(k.endswith(".ls1.gamma") for k in state_dict)
    return ("dinov2" if is_v2 else "dino"), dim, depth, patch, registers


def detect_dino_variant(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Tuple[str, str]:
    """(family, variant) of a DINO v1 / DINOv2 backbone state_dict, e.g. ``("dinov2", "vits14_reg4")``."""
    family, dim, depth, patch, registers = describe_state_dict(state_dict, source)
    shape = TimmVariant("", patch, dim, depth, registers)
    for name, v in FAMILIES[family].items():
        if (v.patch, v.embed_dim, v.depth, v.registers) == (patch, dim, depth, registers):
            return family, name
    known = ", ".join(f"{n} ({v.label}, depth {v.depth})" for n, v in FAMILIES[family].items())
    raise CheckpointError(
        f"{source} is a {_FAMILY_NAMES[family]}-like ViT of unknown size ({shape.label}, embed dim {dim}, "
        f"depth {depth}); known {_FAMILY_NAMES[family]} variants: {known}."
    )


class _DinoFamilyTeacher(TimmTeacher):
    """The shared part of :class:`DinoTeacher` and :class:`Dinov2Teacher` (see the module doc)."""

    mean = _MEAN
    std = _STD
    # timm's converter: DINOv2 -> timm keys, pos_embed resampled to the grid
    converter = staticmethod(checkpoint_filter_fn)

    def check_file(self, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
        _check_variant(self.family, self.variant, state_dict, path)

    @classmethod
    def detect_variant(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> str:
        found_family, found = detect_dino_variant(state_dict, source)
        if found_family != cls.family:
            raise CheckpointError(
                f"{source} is a {_FAMILY_NAMES[found_family]} {FAMILIES[found_family][found].label} backbone ({found}) "
                f"but this is the {cls.family} teacher; use the {found_family} teacher (type: {found_family}) or a "
                f"{_FAMILY_NAMES[cls.family]} checkpoint (python tools/download_weights.py --list).")
        return found


@TEACHERS.register("dino")
class DinoTeacher(_DinoFamilyTeacher):
    """Frozen DINO (v1) ViT: ``variant`` vits16 | vitb16 | vits8 | vitb8; official
    ``dino_*_pretrain.pth`` files. Features: ``patch_tokens`` (B, C, S/p, S/p) (primary) and
    ``cls_token`` (B, C, 1, 1) with stride S; see the module docstring."""

    family = "dino"
    label = "DINO"
    variants = DINO_VARIANTS
    default_variant = "vits16"
    preprocessing = preprocessing_id("dino", _MEAN, _STD)

    def __init__(
        self,
        variant: str = "auto",
        checkpoint: Optional[str] = None,
        input_size: int = 224,
        init: str = "pretrained",
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._build(self.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size, init=init,
                                       dtype=dtype, device=device, seed=seed))


@TEACHERS.register("dinov2")
class Dinov2Teacher(_DinoFamilyTeacher):
    """Frozen DINOv2 ViT: ``variant`` vits14 | vitb14 | vitl14 | vitg14, each also ``*_reg4`` (four
    register tokens); official ``dinov2_*_pretrain.pth`` files. Features: ``patch_tokens``
    (B, C, S/14, S/14) (primary; registers dropped) and ``cls_token`` (B, C, 1, 1) with stride S."""

    family = "dinov2"
    label = "DINOv2"
    variants = DINOV2_VARIANTS
    default_variant = "vits14"
    preprocessing = preprocessing_id("dinov2", _MEAN, _STD)

    def __init__(
        self,
        variant: str = "auto",
        checkpoint: Optional[str] = None,
        input_size: int = 518,
        init: str = "pretrained",
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._build(self.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size, init=init,
                                       dtype=dtype, device=device, seed=seed))


# ---------------------------------------------------------------------- helpers
def _check_variant(family: str, variant: str, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse a checkpoint of another variant (or family) before it is loaded, naming what it is."""
    found_family, found = detect_dino_variant(state_dict, source=f"checkpoint {path}")
    if (found_family, found) == (family, variant):
        return
    what = f"a {_FAMILY_NAMES[found_family]} {FAMILIES[found_family][found].label} backbone ({found})"
    want = f"{_FAMILY_NAMES[family]} {FAMILIES[family][variant].label} ({variant})"
    if found_family != family:
        raise CheckpointError(
            f"checkpoint {path} is {what} but this is the {family} teacher, set to {want}; use the "
            f"{found_family} teacher (type: {found_family}, teacher.variant={found}) or a {family} checkpoint "
            f"(`{weights_for(family, variant).download_command}`)."
        )
    raise CheckpointError(
        f"checkpoint {path} is {what} but teacher.variant is {variant} ({want}); set teacher.variant={found} or "
        f"teacher.variant=auto (or use the {variant} checkpoint: `{weights_for(family, variant).download_command}`)."
    )
