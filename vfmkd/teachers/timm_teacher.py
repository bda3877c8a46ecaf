"""The shared implementation of the teachers timm builds (DINO, DINOv2, DINOv3, C-RADIO, PE-core).

Each family file names its variants (:class:`TimmVariant`: the timm model, its patch size and width),
recognises its official checkpoint from the tensors, and converts it with timm's own
``checkpoint_filter_fn`` of that model; this base builds the model, loads the weights (or takes the loud
``init: random`` path), and owns the preprocessing and the token -> map split.

Preprocessing (the DINO recipe, the same valid-region geometry as SAM): the long side is resized to
``input_size`` (bicubic, PIL; new side = ``int(side * input_size / long_side + 0.5)``, SAM's rule), the
image is normalised with the family's mean/std and zero-padded (after normalisation, i.e. with the mean
colour) at the bottom/right into a square ``input_size`` canvas. ``affine`` = (new_w / w, new_h / h, 0, 0)
and ``valid_hw`` = (new_h, new_w), anchored top-left.

Features of a ViT family for a ``(B, 3, S, S)`` batch (``S = input_size``, ``p`` the patch size):
``patch_tokens`` ``(B, C, S/p, S/p)`` (class/summary and register tokens dropped; the primary feature)
and the family's global token as a ``(B, C', 1, 1)`` map whose ``FeatureSpec.stride`` is ``S`` (one cell
covering the whole canvas; :attr:`BaseTeacher.summary_feature` names it), so caches, statistics and
losses carry it like any map. Convention: the cell's centre is the canvas centre ``(S/2, S/2)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Sequence, Tuple

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from vfmkd.core.errors import CheckpointError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.teachers.base import BaseTeacher, TeacherBatch, TeacherSettings, check_rgb_images, resized_hw
from vfmkd.teachers.loading import checkpoint_path, load_teacher_weights, seeded

logger = logging.getLogger("vfmkd")

#: timm's converter of one model family: (official state_dict, the timm model) -> timm state_dict
Converter = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TimmVariant:
    """One official backbone: the timm model that runs it and the shapes that identify its checkpoint
    (``depth`` = blocks; for a ConvNeXt the blocks of its third stage)."""

    timm_name: str
    patch: int
    embed_dim: int
    depth: int
    registers: int = 0

    @property
    def label(self) -> str:  # e.g. "ViT-S/14 with 4 registers"
        size = {384: "S", 768: "B", 1024: "L", 1152: "SO400M", 1280: "H", 1536: "g"}.get(self.embed_dim,
                                                                                          f"{self.embed_dim}d")
        return f"ViT-{size}/{self.patch}" + (f" with {self.registers} registers" if self.registers else "")


def preprocessing_id(family: str, mean: Sequence[float], std: Sequence[float]) -> str:
    """The fingerprint's name for the recipe of :meth:`TimmTeacher.preprocess`."""
    fmt = lambda t: "/".join(f"{v:.3f}" for v in t)  # noqa: E731
    return f"{family}:resize-longest-side-bicubic,pad-bottom-right,mean={fmt(mean)},std={fmt(std)}"


#: (key that only this model's official files have, what the file is), first match wins
_SIGNATURES = (
    ("radio_model.model.patch_generator.embedder.weight", "a C-RADIO checkpoint (NVIDIA's layout; teacher type radio)"),
    ("storage_tokens", "a DINOv3 ViT checkpoint (Meta's layout; teacher type dinov3)"),
    ("downsample_layers.0.0.weight", "a ConvNeXt checkpoint (Meta's layout; a DINOv3 one is teacher type "
                                     "dinov3_convnext)"),
    ("register_tokens", "a DINOv2 ViT with registers (teacher type dinov2)"),
    ("mask_token", "a DINOv2 ViT checkpoint (teacher type dinov2)"),
    ("image_encoder.neck.0.weight", "a SAM checkpoint (teacher type sam)"),
    ("image_encoder.trunk.patch_embed.proj.weight", "a SAM2 checkpoint (teacher type sam2)"),
    ("visual.attn_pool.probe", "a Perception Encoder (PE-core) checkpoint (Meta's layout; teacher type pe_core)"),
    ("visual.conv1.weight", "a CLIP checkpoint"),
    ("model.0.conv.weight", "an ultralytics YOLO state_dict"),
)


def describe_file(state_dict: Mapping[str, torch.Tensor]) -> str:
    """What model a state_dict belongs to, from keys only its official files have (for the message of a
    teacher handed another model's file), else its first keys."""
    for key, what in _SIGNATURES:
        if key in state_dict:
            return what
    if "cls_token" in state_dict and "patch_embed.proj.weight" in state_dict:
        return "a ViT checkpoint in timm's or DINO v1's layout"
    return f"not a known teacher checkpoint (first keys: {', '.join(list(state_dict)[:4])})"


class TimmTeacher(BaseTeacher):
    """A frozen timm backbone with the shared build, preprocessing and token split (see the module doc).

    Subclasses set ``family``, ``variants`` (name -> :class:`TimmVariant`), :attr:`label`, :attr:`mean` /
    :attr:`std`, :attr:`converter` and implement :meth:`check_file`; a family whose output is not a token
    sequence overrides :meth:`feature_specs` and :meth:`forward_features`."""

    primary_feature = "patch_tokens"
    summary_feature = "cls_token"
    #: the family's name in messages (``DINOv3``)
    label: str = ""
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    #: timm's checkpoint_filter_fn for this model family (official layout -> timm keys)
    converter: Converter

    def check_file(self, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
        """Refuse a checkpoint of another variant or family before it is loaded, naming what it is."""
        found = type(self).detect_variant(state_dict, f"checkpoint {path}")
        if found != self.variant:
            raise CheckpointError(
                f"checkpoint {path} is a {self.label} {self.variants[found].label} backbone ({found}) but "
                f"teacher.variant is {self.variant}; set teacher.variant={found} or teacher.variant=auto.")

    def create_model(self, input_size: int) -> nn.Module:
        """The timm model of the variant at ``input_size`` (random weights; the file is loaded after)."""
        return timm.create_model(self.spec.timm_name, pretrained=False, num_classes=0, img_size=input_size)

    def _build(self, settings: TeacherSettings) -> None:
        """Build the timm model from validated settings and load the checked official file."""
        variant, checkpoint, input_size, init, seed = (settings.variant, settings.checkpoint, settings.input_size,
                                                       settings.init, settings.seed)
        dev = self._adopt(settings, self.label)
        self.spec = self.variants[variant]
        logger.info("%s %s is a %s (timm %s)", self.label, variant, self.spec.label, self.spec.timm_name)
        path = checkpoint_path(self.family, variant, checkpoint)
        state_dict, self._weights_id = load_teacher_weights(self.label, self.family, variant, checkpoint, init, seed,
                                                            self.check_file)
        # Built directly at input_size; random weights come from `seed` alone, so the cache tool and a
        # later live pass of the same config hold the same random teacher.
        with seeded(seed):
            self.model = self.create_model(input_size)
        if state_dict is not None:
            converted = type(self).converter(state_dict, self.model)
            try:
                self.model.load_state_dict(converted, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"checkpoint {path} does not fit {self.label} {variant}: {err}") from None
            logger.info("Loaded %s checkpoint from: %s", self.label, path)
        # CPU normalisation constants: preprocessing runs on CPU in data workers.
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)
        self.to(dev)
        self.freeze()

    @property
    def input_size(self) -> int:
        return self.settings.input_size

    @classmethod
    def _input_multiple(cls, settings: TeacherSettings) -> Tuple[int, str]:
        return cls.variants[settings.variant].patch, f"{cls.label} {settings.variant}'s patch size"

    def summary_channels(self) -> int:
        """Channels of the :attr:`summary_feature` map."""
        return self.spec.embed_dim

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return (FeatureSpec("patch_tokens", self.spec.embed_dim, self.spec.patch),
                FeatureSpec(self.summary_feature, self.summary_channels(), self.input_size))

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[np.ndarray]) -> TeacherBatch:
        """RGB uint8 ``(H_i, W_i, 3)`` images -> pixels ``(B, 3, S, S)`` float32 on CPU (long side resized
        to S bicubically, normalised, zero-padded bottom/right), affine ``(B, 4)`` float32 =
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
        uint8 output is; then normalisation and zero padding bottom/right."""
        return self._resize_crops(images, boxes, lambda h, w: resized_hw(h, w, self.input_size), "bicubic",
                                  self._mean, self._std)

    # ------------------------------------------------------------------ features
    def _check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.input_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"{type(self).__name__} expects pixels (B, 3, {s}, {s}), got {tuple(pixels.shape)}.")

    def summary_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """The global token ``(B, C')`` from the model's tokens ``(B, prefix + N, C)``: the class token."""
        return tokens[:, 0]

    @torch.no_grad()
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` -> {"patch_tokens": (B, C, S/p, S/p), summary_feature: (B, C', 1, 1)}, float32:
        timm's ``forward_features`` (tokens after the final norm, where the model has one), split into the
        prefix (class/summary, registers) and the patch tokens."""
        self._check_pixels(pixels)
        grid = self.input_size // self.spec.patch
        with self.autocast():
            tokens = self.model.forward_features(pixels.to(self.device))  # (B, prefix + grid^2, C)
        tokens = tokens.float()
        b, c = tokens.shape[0], tokens.shape[-1]
        patches = tokens[:, self.model.num_prefix_tokens:]  # class/summary tokens and registers come first
        summary = self.summary_of(tokens)
        return {
            "patch_tokens": patches.reshape(b, grid, grid, c).permute(0, 3, 1, 2).contiguous(),
            self.summary_feature: summary.reshape(b, -1, 1, 1).contiguous(),
        }

