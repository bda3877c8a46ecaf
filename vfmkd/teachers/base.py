"""The contract every frozen teacher fulfils."""
from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.device import AUTO
from vfmkd.core.errors import CheckpointError, ConfigError, did_you_mean
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.fingerprint import TeacherFingerprint  # re-exported: teachers build it, caches store it
from vfmkd.teachers.loading import auto_variant, config_weights_id
from vfmkd.teachers.settings import TeacherSettings, check_choice

logger = logging.getLogger("vfmkd")

_SETTINGS_FIELDS = tuple(f.name for f in fields(TeacherSettings) if f.name not in ("extra", "variant_source"))


@dataclass
class TeacherBatch:
    """A preprocessed batch. ``pixels``: (B, 3, S, S) normalised teacher input.
    ``affine``: (B, 4) as (sx, sy, ox, oy): original image pixel (x, y) lands at teacher input pixel
    (x * sx + ox, y * sy + oy). ``valid_hw``: (B, 2) height/width of the unpadded image region in
    teacher input pixels. Together they let the distiller map teacher cells onto student cells.
    """

    pixels: torch.Tensor
    affine: torch.Tensor
    valid_hw: torch.Tensor


def resized_hw(height: int, width: int, size: int) -> Tuple[int, int]:
    """(new_h, new_w) with the long side at ``size``: segment-anything's ``ResizeLongestSide`` rule
    (``int(side * size / long_side + 0.5)``, i.e. halves round UP, not Python's ``round``), at least
    one pixel. SAM's and DINO's preprocessing and :meth:`BaseTeacher.input_affine` all use it, so the
    geometry an offline run predicts is the one a live pass produces."""
    scale = size * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor) -> List[Tuple[int, int, int, int]]:
    """Check a ``(B, 3, H, W)`` canvas batch and its ``(B, 4)`` integer ``x1, y1, x2, y2`` content
    boxes; returns the boxes clamped into the canvas and at least one pixel wide and high (so the
    affine always describes the crop that is actually preprocessed)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"preprocess_crops expects images (B, 3, H, W), got {tuple(images.shape)}.")
    if boxes.shape != (images.shape[0], 4) or boxes.is_floating_point():
        raise ValueError(f"preprocess_crops expects integer boxes ({images.shape[0]}, 4) as x1, y1, x2, y2, "
                         f"got {boxes.dtype} {tuple(boxes.shape)}.")
    h, w = images.shape[-2:]
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
        out.append((x1, y1, min(max(x2, x1 + 1), w), min(max(y2, y1 + 1), h)))
    return out


def check_rgb_images(images: Sequence[np.ndarray], who: str) -> None:
    """Every item of ``images`` must be an RGB uint8 ``(H, W, 3)`` array, and there must be one."""
    if len(images) == 0:
        raise ValueError(f"{who}.preprocess got no images.")
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"image {i}: expected an RGB uint8 array (H, W, 3), got {desc}.")


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """Canvas pixels as float32 in [0, 1] (uint8 canvases are accepted too)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


class BaseTeacher(nn.Module, ABC):
    """A frozen foundation model that owns its preprocessing.

    ``extract_features(images)`` takes original RGB uint8 images ``(H_i, W_i, 3)`` of any sizes and
    returns ``(features, batch)`` where ``features[name]`` is ``(B, C, S / stride, S / stride)`` as
    declared by :meth:`feature_specs` and ``batch`` is the :class:`TeacherBatch` geometry.
    The module is always in eval mode, has no trainable parameters and runs without autograd.

    Families built on :class:`TeacherSettings` (all of vfmkd's) call :meth:`settings_from` with their
    constructor kwargs, then :meth:`_adopt`, and set ``self._weights_id``; :meth:`fingerprint` and
    :meth:`config_fingerprint` are then derived, never written per family. A teacher of your own
    may instead override both fingerprint methods.
    """

    family: str = "teacher"
    #: the map a loss distils when it names no ``teacher_feature``
    primary_feature: str = ""
    #: the global (CLS / summary) token map, ``(B, C, 1, 1)`` with stride ``input_size``; "" when the teacher has none
    summary_feature: str = ""
    #: ``teacher.variant`` values of the family (names -> family data); empty = any string
    variants: Mapping[str, Any] = {}
    #: the size ``variant: auto`` means when there is no weights file to read it from (:meth:`detect_variant`
    #: reads it from the file); empty = the family has no ``auto``
    default_variant: str = ""
    #: the resize/pad/normalisation recipe, recorded in the fingerprint
    preprocessing: str = ""
    #: the teacher can be prompted with boxes for mask logits (:meth:`mask_logits`): SAM, LoRA-SAM, SAM2
    can_segment: bool = False
    #: :meth:`forward_with_heads` returns head outputs too (a trained vfmkd model as a teacher)
    provides_head_outputs: bool = False

    settings: TeacherSettings
    _weights_id: str

    def __init__(self) -> None:
        super().__init__()

    def freeze(self) -> None:
        """Call at the end of a subclass constructor."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> BaseTeacher:  # a teacher never leaves eval mode
        return super().train(False)

    # ------------------------------------------------------------------ settings
    @classmethod
    def _bind(cls, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """``kwargs`` bound to ``cls.__init__``'s signature, defaults filled in; an unknown key is a
        ConfigError naming the valid ones (a missing required key: the signature's TypeError)."""
        sig = inspect.signature(cls.__init__)
        params = [p for name, p in sig.parameters.items() if name != "self"]
        names = [p.name for p in params]
        for key in kwargs:
            if key not in names:
                raise ConfigError(f"unknown key 'teacher.{key}' for the {cls.family} "
                                  f"teacher.{did_you_mean(key, names)} Valid keys: {', '.join(names)}.")
        bound = sig.replace(parameters=params).bind(**kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    @classmethod
    def settings_from(cls, **kwargs: Any) -> TeacherSettings:
        """Bind constructor kwargs to ``cls.__init__``'s signature (its defaults filled in) and
        validate them: the shared rules in :class:`TeacherSettings`, then :meth:`_check_settings`."""
        values = cls._bind(kwargs)
        # The variant is checked first: it is the key users mistype most, and the others depend on it.
        source = ""
        if cls.variants:
            check_choice("variant", values.get("variant"), ([AUTO] if cls.default_variant else []) + list(cls.variants))
            if values["variant"] == AUTO:
                values["variant"], source, read = cls._auto_variant(values)
                if read and "checkpoint" in values:
                    values["checkpoint"] = read  # the file that was read is the one to load, whatever its size
        common = {k: values.pop(k) for k in _SETTINGS_FIELDS if k in values}
        settings = TeacherSettings(**common, extra=values, variant_source=source)
        cls._check_settings(settings)
        return settings

    @classmethod
    def _auto_variant(cls, values: Mapping[str, Any]) -> Tuple[str, str, Optional[str]]:
        """``(variant, how it was chosen, the weights file read)`` for ``variant: auto`` from the bound constructor
        kwargs: the weights file's size (:func:`vfmkd.teachers.loading.auto_variant`); LoRA-SAM also asks its LoRA
        file."""
        return auto_variant(cls.family, cls.default_variant, values.get("checkpoint"), values.get("init", "pretrained"),
                            cls.detect_variant)

    @classmethod
    def detect_variant(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> str:
        """The variant a weights state_dict belongs to, from its tensors; families with a
        :attr:`default_variant` override this (CheckpointError naming ``source`` when it is not theirs)."""
        raise CheckpointError(f"the {cls.family} teacher cannot tell the variant of {source} from its tensors; "
                              f"set teacher.variant to one of: {', '.join(cls.variants)}.")

    @classmethod
    def _check_settings(cls, settings: TeacherSettings) -> None:
        """The family's own rules on top of the shared ones; the default checks ``input_size``
        against :meth:`_input_multiple`. Raise ConfigError naming ``teacher.<key>`` and the fix."""
        multiple, why = cls._input_multiple(settings)
        size = settings.input_size
        if size % multiple:
            lo = size // multiple * multiple
            near = f"{lo} or {lo + multiple}" if lo else f"{multiple}"
            raise ConfigError(f"teacher.input_size must be a positive multiple of {multiple} ({why}), got {size!r}; "
                              f"nearest valid: {near}.")

    @classmethod
    def _input_multiple(cls, settings: TeacherSettings) -> Tuple[int, str]:
        """(multiple every ``input_size`` must be, why); e.g. ``(16, "SAM's patch size")``."""
        return 1, "any size"

    def _adopt(self, settings: TeacherSettings, label: str) -> torch.device:
        """Record the validated settings on the instance; returns the device to build on."""
        dev = settings.torch_device()
        self.settings = settings
        self.variant = settings.variant
        self.init = settings.init
        self.dtype = settings.computed_dtype  # what actually runs (the fingerprint records it)
        auto = f" (variant auto: {settings.variant_source})" if settings.variant_source else ""
        logger.info("Using %s teacher model: %s%s on %s in %s", label, settings.variant, auto, dev, self.dtype)
        if settings.dtype != self.dtype:
            logger.info("%s teacher: dtype=%s requested on %s; computing in float32.", label, settings.dtype, dev.type)
        return dev

    def autocast(self) -> ContextManager[None]:
        """The teacher's compute dtype on its device (bf16/fp16 autocast on CUDA, else a no-op)."""
        return self.settings.autocast(self.device)

    # ------------------------------------------------------------------ fingerprints
    @classmethod
    def _fingerprint(cls, settings: TeacherSettings, weights_id: str) -> TeacherFingerprint:
        """The fingerprint of a teacher with these settings and weights; families with more to say
        than ``family``/``variant``/``preprocessing`` (LoRA-SAM) override this hook."""
        return TeacherFingerprint(family=cls.family, variant=settings.variant, weights=weights_id,
                                  input_size=settings.input_size, dtype=settings.computed_dtype,
                                  preprocessing=cls.preprocessing)

    @classmethod
    def _config_weights_id(cls, settings: TeacherSettings) -> str:
        """The weights id a build would record, from the files on this machine (no model built)."""
        return config_weights_id(cls.family, settings.variant, settings.checkpoint, settings.init, settings.seed)

    def fingerprint(self) -> TeacherFingerprint:
        """Identity of the features this teacher produces."""
        return type(self)._fingerprint(self.settings, self._weights_id)

    @classmethod
    def config_fingerprint(cls, **kwargs: Any) -> TeacherFingerprint:
        """The fingerprint a teacher built with these constructor kwargs would have, without
        building it (offline runs check their caches this way). ``weights`` starts with
        ``unknown`` when the checkpoint is not on this machine."""
        settings = cls.settings_from(**kwargs)
        return cls._fingerprint(settings, cls._config_weights_id(settings))

    # ------------------------------------------------------------------ geometry
    @property
    @abstractmethod
    def input_size(self) -> int:
        """Side of the square canvas the teacher sees, in pixels."""

    @abstractmethod
    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        """The maps :meth:`forward_features` returns; strides relative to :attr:`input_size`."""

    @abstractmethod
    def preprocess(self, images: Sequence[np.ndarray]) -> TeacherBatch:
        """Resize, pad and normalise original RGB uint8 images into one batch."""

    @classmethod
    def input_affine(cls, height: int, width: int, input_size: int) -> Tuple[float, float, float, float]:
        """(sx, sy, ox, oy) that :meth:`preprocess` applies to a ``height`` x ``width`` image. The
        default is the common recipe (long side to ``input_size`` by :func:`resized_hw`, padding
        bottom-right); override it when ``preprocess`` differs (SAM2 stretches to a square). Offline
        runs use it to predict how a live pass would see an augmented view without loading the model."""
        nh, nw = resized_hw(height, width, input_size)
        return (nw / width, nh / height, 0.0, 0.0)

    @torch.no_grad()
    def preprocess_crops(self, images: torch.Tensor, boxes: torch.Tensor) -> TeacherBatch:
        """Live preprocessing of training canvases. ``images`` ``(B, 3, H, W)`` float in [0, 1] on any
        device, ``boxes`` ``(B, 4)`` int64 ``x1, y1, x2, y2`` canvas pixels of each image's content.
        Each crop ``images[i, :, y1:y2, x1:x2]`` is preprocessed as :meth:`preprocess` would
        preprocess it; ``affine`` maps CROP pixels ``(x - x1, y - y1)`` to teacher pixels
        (= :meth:`input_affine` of the crop size). Everything comes back on ``images.device``.

        This default round-trips through :meth:`preprocess` (uint8 on the CPU), so any teacher works;
        vfmkd's teachers override it with the same recipe in torch ops on the device."""
        dev = images.device
        pixels = (unit_float(images).clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        crops = [np.ascontiguousarray(pixels[i, y1:y2, x1:x2]) for i,
                 (x1, y1, x2, y2) in enumerate(crop_boxes(images, boxes))]
        batch = self.preprocess(crops)
        return TeacherBatch(pixels=batch.pixels.to(dev), affine=batch.affine.to(dev), valid_hw=batch.valid_hw.to(dev))

    def _resize_crops(self, images: torch.Tensor, boxes: torch.Tensor, out_hw: Callable[[int, int], Tuple[int, int]],
                      mode: str, mean: torch.Tensor, std: torch.Tensor, value_scale: float = 1.0) -> TeacherBatch:
        """The device path of :meth:`preprocess_crops` for resize-normalise-pad recipes: each crop is
        resized to ``out_hw(h, w)`` by ``F.interpolate(mode, antialias=True)``, clamped to [0, 1] (as a
        uint8 image would be), scaled by ``value_scale`` (255 for SAM's 0-255 constants), normalised
        with ``mean``/``std`` ``(3, 1, 1)`` and placed top-left on a zero ``(S, S)`` canvas."""
        s, dev = self.input_size, images.device
        mean, std = mean.to(dev), std.to(dev)
        out = torch.zeros(images.shape[0], 3, s, s, device=dev)
        affine = torch.zeros(images.shape[0], 4)
        valid = torch.zeros(images.shape[0], 2, dtype=torch.long)
        x = unit_float(images)
        for i, (x1, y1, x2, y2) in enumerate(crop_boxes(images, boxes)):
            h, w = y2 - y1, x2 - x1
            nh, nw = out_hw(h, w)
            crop = x[i : i + 1, :, y1:y2, x1:x2]
            resized = F.interpolate(crop, size=(nh, nw), mode=mode, align_corners=False, antialias=True)[0]
            out[i, :, :nh, :nw] = (resized.clamp_(0, 1) * value_scale - mean) / std
            affine[i] = torch.tensor([nw / w, nh / h, 0.0, 0.0])
            valid[i] = torch.tensor([nh, nw])
        return TeacherBatch(pixels=out, affine=affine.to(dev), valid_hw=valid.to(dev))

    # ------------------------------------------------------------------ features
    @abstractmethod
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Run the frozen model on a preprocessed batch."""

    def forward_with_heads(self, pixels: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """``(features, head_outputs)`` of one pass on a preprocessed batch. Teachers with
        :attr:`provides_head_outputs` override it to return their heads' raw training outputs keyed
        by head name (what ``TeacherTargets.head_outputs`` carries); the default returns
        ``(forward_features(pixels), {})``."""
        return self.forward_features(pixels), {}

    def mask_logits(self, features: Dict[str, torch.Tensor], boxes: torch.Tensor,
                    batch_idx: torch.Tensor) -> torch.Tensor:
        """Box-prompted mask logits of teachers with :attr:`can_segment`.

        ``features``: what :meth:`forward_features` returned for a batch (B images); ``boxes`` (N, 4)
        float x1, y1, x2, y2 in teacher-input pixels (the frame of ``TeacherBatch.affine``);
        ``batch_idx`` (N,) int64 image of each box. Returns (N, S/4, S/4) float32 logits on the canvas
        of the features (``S = input_size``; SAM's ``low_res_masks`` with ``multimask_output=False``).
        The base class cannot segment: it raises :class:`ConfigError` naming the teachers that can."""
        raise ConfigError(f"the {self.family} teacher cannot be prompted for mask logits (can_segment is False); "
                          f"teachers that can: {', '.join(segmenting_teachers())}.")

    def _boxes_by_image(self, boxes: torch.Tensor, batch_idx: torch.Tensor, batch: int) -> List[torch.Tensor]:
        """Check ``mask_logits``' box arguments; returns, per image of the batch, the indices of its boxes."""
        if boxes.ndim != 2 or boxes.shape[1] != 4 or batch_idx.shape != (boxes.shape[0],):
            raise ValueError(f"mask_logits expects boxes (N, 4) and batch_idx (N,), got {tuple(boxes.shape)} and "
                             f"{tuple(batch_idx.shape)}.")
        idx = batch_idx.to(torch.int64).cpu()
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= batch):
            raise ValueError(f"mask_logits: batch_idx in [{int(idx.min())}, {int(idx.max())}] but the features hold "
                             f"{batch} images.")
        return [torch.nonzero(idx == b).view(-1) for b in range(batch)]

    @property
    def device(self) -> torch.device:
        for t in self.buffers():
            return t.device
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def extract_features(self, images: Sequence[np.ndarray]) -> Tuple[Dict[str, torch.Tensor], TeacherBatch]:
        batch = self.preprocess(images)
        batch.pixels = batch.pixels.to(self.device)
        return self.forward_features(batch.pixels), batch


#: box prompts per mask-decoder call (bounds the decoder's repeated image embedding in memory)
MASK_CHUNK = 32


def segmenting_teachers() -> List[str]:
    """Registered teacher names whose class can be prompted for mask logits (``can_segment``)."""
    from vfmkd.core.registry import TEACHERS

    out = []
    for name in TEACHERS.names():
        obj = TEACHERS.get(name)
        if isinstance(obj, type) and getattr(obj, "can_segment", False):
            out.append(name)
    return out or ["sam", "lora_sam", "sam2"]
