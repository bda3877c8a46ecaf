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

Preprocessing (owned by the teacher, the same valid-region geometry as SAM): the long side is resized
to ``input_size`` (bicubic, PIL; new side = ``int(side * input_size / long_side + 0.5)``, SAM's rule),
the image is normalised with the ImageNet mean/std and zero-padded (after normalisation, i.e. with the
mean colour) at the bottom/right into a square ``input_size`` canvas. ``affine`` = (new_w / w,
new_h / h, 0, 0) and ``valid_hw`` = (new_h, new_w), anchored top-left.

Features for a ``(B, 3, S, S)`` batch (``S = input_size``, ``p`` the patch size, after the final
LayerNorm):

* ``patch_tokens`` ``(B, C, S/p, S/p)``: the patch tokens as a spatial map (class and register tokens
  dropped); the primary feature;
* ``cls_token`` ``(B, C, 1, 1)``: the class token as a 1x1 map whose ``FeatureSpec.stride`` is ``S``
  (one cell covering the whole canvas), so the same cache, statistics and loss machinery carry it: a
  loss resamples it onto the student grid as a constant map over the image region. Convention: the
  cell's centre is the canvas centre ``(S/2, S/2)``, so code that counts a cell as valid when its
  centre lies in the image (the cache's statistics) sees it only for images whose short side is more
  than half the long side (aspect ratio < 2:1).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import checkpoint_filter_fn

from vfmkd.core.errors import CheckpointError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.official_weights import weights_for
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.base import BaseTeacher, TeacherBatch, TeacherSettings, check_rgb_images, resized_hw
from vfmkd.teachers.loading import checkpoint_path, load_teacher_weights, seeded

logger = logging.getLogger("vfmkd")


@dataclass(frozen=True)
class DinoVariant:
    """One official backbone: the timm model that runs it and the shapes that identify its checkpoint."""

    timm_name: str
    patch: int
    embed_dim: int
    depth: int
    registers: int = 0

    @property
    def label(self) -> str:  # e.g. "ViT-S/14 with 4 registers"
        size = {384: "S", 768: "B", 1024: "L", 1536: "g"}.get(self.embed_dim, f"{self.embed_dim}d")
        return f"ViT-{size}/{self.patch}" + (f" with {self.registers} registers" if self.registers else "")


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
    shape = DinoVariant("", patch, dim, depth, registers)
    for name, v in FAMILIES[family].items():
        if (v.patch, v.embed_dim, v.depth, v.registers) == (patch, dim, depth, registers):
            return family, name
    known = ", ".join(f"{n} ({v.label}, depth {v.depth})" for n, v in FAMILIES[family].items())
    raise CheckpointError(
        f"{source} is a {_FAMILY_NAMES[family]}-like ViT of unknown size ({shape.label}, embed dim {dim}, "
        f"depth {depth}); known {_FAMILY_NAMES[family]} variants: {known}."
    )


def preprocessing_id(family: str) -> str:
    """The fingerprint's name for the recipe of :meth:`_DinoFamilyTeacher.preprocess`."""
    fmt = lambda t: "/".join(f"{v:.3f}" for v in t)  # noqa: E731
    return f"{family}:resize-longest-side-bicubic,pad-bottom-right,mean={fmt(_MEAN)},std={fmt(_STD)}"


class _DinoFamilyTeacher(BaseTeacher):
    """The shared implementation of :class:`DinoTeacher` and :class:`Dinov2Teacher` (see the module doc)."""

    family = ""
    primary_feature = "patch_tokens"

    def _build(self, settings: TeacherSettings) -> None:
        """Build the timm model from validated settings (shared by both registered constructors)."""
        variant, checkpoint, input_size, init, seed = (settings.variant, settings.checkpoint, settings.input_size,
                                                       settings.init, settings.seed)
        family_name = _FAMILY_NAMES[self.family]
        dev = self._adopt(settings, family_name)
        self.spec = self.variants[variant]
        logger.info("%s %s is a %s (timm %s)", family_name, variant, self.spec.label, self.spec.timm_name)

        path = checkpoint_path(self.family, variant, checkpoint)
        state_dict, self._weights_id = load_teacher_weights(
            family_name, self.family, variant, checkpoint, init, seed,
            lambda sd, p: _check_variant(self.family, variant, sd, p),
        )

        # Built directly at input_size; random weights come from `seed` alone, so the cache tool and a
        # later live pass of the same config hold the same random teacher.
        with seeded(seed):
            self.model = timm.create_model(self.spec.timm_name, pretrained=False, num_classes=0, img_size=input_size)
        if state_dict is not None:
            # timm's converter for this family: DINOv2 -> timm keys, pos_embed resampled to the grid.
            converted = checkpoint_filter_fn(state_dict, self.model)
            try:
                self.model.load_state_dict(converted, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"checkpoint {path} does not fit {family_name} {variant}: {err}") from None
            logger.info("Loaded %s checkpoint from: %s", family_name, path)
        # CPU normalisation constants: preprocessing runs on CPU in data workers.
        self._mean = torch.tensor(_MEAN).view(3, 1, 1)
        self._std = torch.tensor(_STD).view(3, 1, 1)
        self.to(dev)
        self.freeze()

    @property
    def input_size(self) -> int:
        return self.settings.input_size

    @classmethod
    def detect_variant(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> str:
        found_family, found = detect_dino_variant(state_dict, source)
        if found_family != cls.family:
            raise CheckpointError(
                f"{source} is a {_FAMILY_NAMES[found_family]} {FAMILIES[found_family][found].label} backbone ({found}) "
                f"but this is the {cls.family} teacher; use the {found_family} teacher (type: {found_family}) or a "
                f"{_FAMILY_NAMES[cls.family]} checkpoint (python tools/download_weights.py --list).")
        return found

    @classmethod
    def _input_multiple(cls, settings: TeacherSettings) -> Tuple[int, str]:
        return cls.variants[settings.variant].patch, f"{_FAMILY_NAMES[cls.family]} {settings.variant}'s patch size"

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        c = self.spec.embed_dim
        return (FeatureSpec("patch_tokens", c, self.spec.patch), FeatureSpec("cls_token", c, self.input_size))

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[np.ndarray]) -> TeacherBatch:
        """RGB uint8 ``(H_i, W_i, 3)`` images -> pixels ``(B, 3, S, S)`` float32 on CPU (long side resized
        to S bicubically, ImageNet-normalised, zero-padded bottom/right), affine ``(B, 4)`` float32 =
        (new_w/w, new_h/h, 0, 0), valid_hw ``(B, 2)`` int64 = (new_h, new_w)."""
        check_rgb_images(images, type(self).__name__)
        s = self.input_size
        pixels = torch.zeros(len(images), 3, s, s)
        affine = torch.zeros(len(images), 4)
        valid = torch.zeros(len(images), 2, dtype=torch.long)
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            nh, nw = resized_hw(h, w, s)
            resized = np.array(Image.fromarray(np.ascontiguousarray(img)).resize((nw, nh), Image.BICUBIC))
            x = torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0
            pixels[i, :, :nh, :nw] = (x - self._mean) / self._std
            affine[i] = torch.tensor([nw / w, nh / h, 0.0, 0.0])
            valid[i] = torch.tensor([nh, nw])
        return TeacherBatch(pixels=pixels, affine=affine, valid_hw=valid)

    @torch.no_grad()
    def preprocess_crops(self, images: torch.Tensor, boxes: torch.Tensor) -> TeacherBatch:
        """:meth:`preprocess` on the device: canvases ``(B, 3, H, W)`` in [0, 1] and content boxes
        ``(B, 4)`` -> pixels ``(B, 3, S, S)``, affine ``(B, 4)`` (crop pixels -> teacher pixels),
        valid_hw ``(B, 2)``, all on ``images.device``. The long side goes to S with torch's antialiased
        bicubic (PIL's bicubic filter also widens with the downscale factor), clamped to [0, 1] as PIL's
        uint8 output is; then ImageNet normalisation and zero padding bottom/right."""
        return self._resize_crops(images, boxes, lambda h, w: resized_hw(h, w, self.input_size), "bicubic",
                                  self._mean, self._std)

    @torch.no_grad()
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` -> {"patch_tokens": (B, C, S/p, S/p), "cls_token": (B, C, 1, 1)}, float32:
        timm's ``forward_features`` (tokens after the final LayerNorm), split into class and patch tokens."""
        s = self.input_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"{type(self).__name__} expects pixels (B, 3, {s}, {s}), got {tuple(pixels.shape)}.")
        grid = s // self.spec.patch
        with self.autocast():
            tokens = self.model.forward_features(pixels.to(self.device))  # (B, prefix + grid^2, C)
        tokens = tokens.float()
        b, c = tokens.shape[0], tokens.shape[-1]
        patches = tokens[:, self.model.num_prefix_tokens:]  # class token and registers come first
        return {
            "patch_tokens": patches.reshape(b, grid, grid, c).permute(0, 3, 1, 2).contiguous(),
            "cls_token": tokens[:, 0].reshape(b, c, 1, 1).contiguous(),
        }


@TEACHERS.register("dino")
class DinoTeacher(_DinoFamilyTeacher):
    """Frozen DINO (v1) ViT: ``variant`` vits16 | vitb16 | vits8 | vitb8; official
    ``dino_*_pretrain.pth`` files. Features: ``patch_tokens`` (B, C, S/p, S/p) (primary) and
    ``cls_token`` (B, C, 1, 1) with stride S; see the module docstring."""

    family = "dino"
    variants = DINO_VARIANTS
    default_variant = "vits16"
    preprocessing = preprocessing_id("dino")

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
    variants = DINOV2_VARIANTS
    default_variant = "vits14"
    preprocessing = preprocessing_id("dinov2")

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
