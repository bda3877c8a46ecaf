"""A trained vfmkd student as a frozen teacher
(``teachers.<name>: {type: vfmkd, checkpoint: <run>/checkpoints/best.pt}``).

The checkpoint is a run's training checkpoint (``Trainer.save``: ``model`` state dict, ``config`` the
resolved experiment). It is read with :func:`vfmkd.utils.checkpoint.load_checkpoint` (``weights_only=True``,
no unsafe fallback), the student is rebuilt from its own ``config["model"]`` with
:meth:`UnifiedModel.from_config`, its weights are loaded strictly and it is frozen.

What it provides:

* **features**: the backbone levels (``P3``/``P4``/``P5`` for a YOLOv8 trunk, as the backbone's
  :meth:`feature_specs` declare them); the primary feature is the deepest level;
* **head outputs** (:meth:`VfmkdTeacher.forward_with_heads`): every head's raw TRAINING-form output
  (ultralytics' dict ``boxes`` (B, 4*reg_max, A), ``scores`` (B, nc, A), ``feats`` ...; a segmentation
  head adds ``mask_coefficient``/``proto``; semantic/binary heads their logits), computed without
  autograd and with BatchNorm in eval mode, for ``cls_distill`` / ``mask_distill``.

Its input is the student's own canvas. ``input_size`` defaults to the run's ``data.img_size``.
A run trained with DSRL (``model.resolution_distill``) downsizes that canvas inside its model, exactly as
at its own evaluation, so its levels' strides (:meth:`VfmkdTeacher.feature_specs`) are in canvas pixels.
:meth:`VfmkdTeacher.preprocess` (original images) is the YOLO letterbox of
:func:`vfmkd.datasets.transforms.letterbox` divided by 255, exactly what the run trained on.
:meth:`VfmkdTeacher.preprocess_crops` (live passes) takes the WHOLE canvas unchanged (resized only
when the canvas side differs from ``input_size``) and reports the affine of the content box as if it had
been cropped, so :class:`vfmkd.distillation.online_distiller.OnlineTeacher`'s canvas -> teacher affine is the
identity (``(1, 1, 0, 0)``) and the teacher's anchors are the student's anchors when the student's
``img_size`` equals the teacher's ``input_size``. ``valid_hw`` is the whole canvas in both paths: the
letterbox padding is part of what this teacher was trained on.

**Live only.** There is no feature cache for this teacher (its value is its head outputs on the
augmented view the student sees): configure it with ``offline: false``. :data:`LIVE_ONLY_MESSAGE` is
the refusal the cache tool and an ``offline: true`` entry should give (see :attr:`VfmkdTeacher.live_only`).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Detect

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS, TEACHERS
from vfmkd.datasets.transforms import letterbox
from vfmkd.models.input_scale import check_input_geometry
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.tasks import canvas_stride_heads, task_of
from vfmkd.teachers.base import BaseTeacher, TeacherBatch, TeacherSettings, check_rgb_images, crop_boxes, unit_float
from vfmkd.utils.checkpoint import load_checkpoint, sha256_of_file

logger = logging.getLogger("vfmkd")

#: what refuses this teacher as a cached (offline) one
LIVE_ONLY_MESSAGE = ("the vfmkd teacher is live only: set offline: false (it runs on the student's own augmented "
                     "canvas in the training step; there is no feature cache for it)")
_HINT = "pass a vfmkd run's checkpoint, e.g. work_dirs/<run>/checkpoints/best.pt"


def _run_checkpoint(checkpoint: str) -> Dict[str, Any]:
    """The training checkpoint of a vfmkd run, loaded weights_only; CheckpointError when it is not one."""
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"vfmkd teacher checkpoint not found: {path} (absolute: {path.resolve()}); {_HINT}.")
    state = load_checkpoint(path)  # weights_only=True; a pickle-carrying file is refused there
    cfg = state.get("config")
    if not isinstance(state.get("model"), Mapping) or not isinstance(cfg, Mapping) \
            or not isinstance(cfg.get("model"), Mapping) or not isinstance(cfg.get("data"), Mapping):
        raise CheckpointError(
            f"{path} is not a vfmkd training checkpoint: it needs a 'model' state dict and the run's 'config' with "
            f"its 'model' and 'data' sections (found keys: {', '.join(map(str, list(state)[:8]))}); {_HINT}."
        )
    model_cfg = cfg["model"]
    for key in ("backbone", "neck", "heads"):
        if not isinstance(model_cfg.get(key), Mapping):
            raise CheckpointError(f"{path}: its config has no model.{key} section; {_HINT}.")
    if not model_cfg["heads"]:
        raise CheckpointError(f"{path}: its model has no heads, so it has no outputs to distil; {_HINT}.")
    return state


def student_variant(model_cfg: Mapping[str, Any]) -> str:
    """``<backbone type>-<variant>`` of a run's ``model`` section (``yolov8-n``), or the type alone."""
    bb = model_cfg["backbone"]
    variant = bb.get("variant")
    return f"{bb['type']}-{variant}" if variant not in (None, "") else str(bb["type"])


def _float32(obj: Any) -> Any:
    """Floating tensors (also inside dicts/lists/tuples) as float32; the structure is kept."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_float32(v) for v in obj)
    return obj


@TEACHERS.register("vfmkd")
class VfmkdTeacher(BaseTeacher):
    """A frozen vfmkd student (see the module docstring).

    Keys: ``checkpoint`` (required) a run's training checkpoint; ``variant`` optional, must then be the
    checkpoint's ``<backbone type>-<variant>`` (e.g. ``yolov8-s``); ``input_size`` the canvas side, default
    the run's ``data.img_size`` (a multiple of the model's largest stride); ``dtype``, ``device``.

    ``head_tasks``: ``{head name: (task, num_classes)}`` of the checkpoint's heads (``num_classes`` None
    for a head without one). :meth:`check_compatible` checks a student's heads against them.
    """

    family = "vfmkd"
    preprocessing = "vfmkd:yolo-letterbox,centre-pad=114,rgb/255"
    provides_head_outputs = True
    #: no feature cache: :data:`LIVE_ONLY_MESSAGE`
    live_only = True

    def __init__(
        self,
        checkpoint: str,
        variant: Optional[str] = None,
        input_size: Optional[int] = None,
        dtype: str = "auto",
        device: str = "auto",
    ) -> None:
        super().__init__()
        settings, state = self._resolve(checkpoint=checkpoint, variant=variant, input_size=input_size,
                                        dtype=dtype, device=device)
        dev = self._adopt(settings, "vfmkd")
        path = Path(checkpoint)
        self._weights_id = sha256_of_file(path)
        cfg = state["config"]
        heads = {n: HEADS.get(e["type"]) for n, e in cfg["model"]["heads"].items()}
        model = UnifiedModel.from_config(cfg["model"], canvas_heads=canvas_stride_heads(heads))
        weights = state["model"]
        bad = [k for k,
               v in weights.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{path}: the model holds NaN/inf values ({', '.join(bad[:3])}); use an earlier "
                                  "checkpoint of the run.")
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: its weights do not fit the model its own config describes "
                                  f"({student_variant(cfg['model'])}): {str(err).splitlines()[0]}") from None
        self.model = model
        # A DSRL run (model.resolution_distill) downsizes its input inside the model (from_config reads the
        # scale from its config): its levels' strides on the canvas this teacher is given are stride x scale.
        scale = model.input_scale
        self._specs: Tuple[FeatureSpec, ...] = tuple(
            replace(s, stride=s.stride * scale) if scale != 1.0 else s for s in model.backbone.feature_specs())
        self.primary_feature = max(self._specs, key=lambda s: s.stride).name
        stride = max(s.stride for s in model.backbone.feature_specs())
        if scale != 1.0:
            check_input_geometry(settings.input_size, scale, stride, where=f"vfmkd teacher {path} (a DSRL run)",
                                 size_key="teacher.input_size")
        elif settings.input_size % stride:
            lo = settings.input_size // stride * stride
            raise ConfigError(f"teacher.input_size must be a multiple of {stride} (the {settings.variant} teacher's "
                              f"largest stride), got {settings.input_size}; nearest valid: "
                              f"{f'{lo} or {lo + stride}' if lo else stride}.")
        self.head_tasks: Dict[str, Tuple[str, Optional[int]]] = {
            name: (task_of(h).name, getattr(h, "num_classes", None)) for name, h in model.heads.items()}
        self.checkpoint_path = str(path)
        self.trained_img_size = int(cfg["data"]["img_size"])
        self.to(dev)
        self.freeze()
        logger.info("Using vfmkd teacher %s (%s, heads %s) at %d px", path, settings.variant,
                    ", ".join(f"{n}={t}/{c}" for n, (t, c) in self.head_tasks.items()), settings.input_size)

    # ------------------------------------------------------------------ settings
    @classmethod
    def _resolve(cls, **kwargs: Any) -> Tuple[TeacherSettings, Dict[str, Any]]:
        """(validated settings, loaded checkpoint). ``variant`` and ``input_size`` come from the
        checkpoint unless given (a given variant must match it)."""
        try:
            values = cls._bind(kwargs)
        except TypeError:
            raise ConfigError(f"the {cls.family} teacher needs teacher.checkpoint ({_HINT}).") from None
        if not isinstance(values["checkpoint"], (str, Path)) or not str(values["checkpoint"]):
            raise ConfigError(f"teacher.checkpoint must be a path ({_HINT}), got {values['checkpoint']!r}.")
        checkpoint = str(values.pop("checkpoint"))
        state = _run_checkpoint(checkpoint)
        cfg = state["config"]
        found = student_variant(cfg["model"])
        variant = values.pop("variant")
        if variant not in (None, "auto") and variant != found:
            raise ConfigError(f"teacher.variant={variant!r} is not valid: checkpoint {checkpoint} holds a {found} "
                              f"student; set teacher.variant={found} or leave it out (it is read from the checkpoint).")
        input_size = values.pop("input_size")
        if input_size is None:
            input_size = cfg["data"].get("img_size")
            if input_size is None:
                raise CheckpointError(f"{checkpoint}: its config has no data.img_size; set teacher.input_size.")
        settings = TeacherSettings(variant=found, checkpoint=checkpoint, input_size=input_size, dtype=values["dtype"],
                                   device=values["device"])
        cls._check_settings(settings)
        return settings, state

    @classmethod
    def settings_from(cls, **kwargs: Any) -> TeacherSettings:
        """The settings of a build with these kwargs; reads the checkpoint (its config), weights_only."""
        return cls._resolve(**kwargs)[0]

    @classmethod
    def _config_weights_id(cls, settings: TeacherSettings) -> str:
        return sha256_of_file(settings.checkpoint)  # _resolve has checked that the file exists

    # ------------------------------------------------------------------ heads
    def num_classes_of(self, head_name: str) -> Optional[int]:
        """``num_classes`` of the teacher's head ``head_name`` (KeyError naming the heads it has)."""
        if head_name not in self.head_tasks:
            raise KeyError(f"the vfmkd teacher {self.checkpoint_path} has no head '{head_name}'; "
                           f"it has {', '.join(self.head_tasks)}")
        return self.head_tasks[head_name][1]

    def teacher_head_for(self, student_head: str, task: str) -> Optional[str]:
        """The teacher head paired with the student's head ``student_head`` of ``task``: the head of
        the same name when it has that task, else the teacher's only head of that task, else None."""
        if self.head_tasks.get(student_head, ("",))[0] == task:
            return student_head
        same = [n for n, (t, _) in self.head_tasks.items() if t == task]
        return same[0] if len(same) == 1 else None

    def check_compatible(self, student_heads: Mapping[str, nn.Module]) -> Dict[str, str]:
        """{student head name: teacher head name} for every student head the teacher has a head of the
        same task for (paired by :meth:`teacher_head_for`). ConfigError, naming both numbers, when a
        paired head predicts another number of classes than the student's."""
        pairs: Dict[str, str] = {}
        for name, head in student_heads.items():
            task = task_of(head).name
            teacher_head = self.teacher_head_for(name, task)
            if teacher_head is None:
                continue
            want, have = getattr(head, "num_classes", None), self.head_tasks[teacher_head][1]
            if want is not None and have is not None and int(want) != int(have):
                raise ConfigError(
                    f"the vfmkd teacher {self.checkpoint_path} ({self.variant}) head '{teacher_head}' ({task}) "
                    f"predicts {have} classes but the student's head '{name}' predicts {want}: output distillation "
                    f"needs the same classes. Set model.heads.{name}.num_classes={have}, or use a teacher trained with "
                    f"{want} classes."
                )
            pairs[name] = teacher_head
        return pairs

    # ------------------------------------------------------------------ geometry
    @property
    def input_size(self) -> int:
        return self.settings.input_size

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    @classmethod
    def input_affine(cls, height: int, width: int, input_size: int) -> Tuple[float, float, float, float]:
        """The affine of :func:`vfmkd.datasets.transforms.letterbox` (ultralytics' LetterBox: scale to fit,
        centred padding) for a ``height`` x ``width`` image, without touching pixels."""
        r = min(input_size / height, input_size / width)
        new_w, new_h = max(round(width * r), 1), max(round(height * r), 1)
        left, top = round((input_size - new_w) / 2 - 0.1), round((input_size - new_h) / 2 - 0.1)
        return (new_w / width, new_h / height, float(left), float(top))

    def preprocess(self, images: Sequence[np.ndarray]) -> TeacherBatch:
        """RGB uint8 ``(H_i, W_i, 3)`` images -> pixels ``(B, 3, S, S)`` float32 in [0, 1] on CPU (the YOLO
        letterbox, as the run's own evaluation sees them), affine ``(B, 4)`` = letterbox's
        (sx, sy, left, top), valid_hw ``(B, 2)`` int64 = (S, S) (the padding is part of the input)."""
        check_rgb_images(images, "VfmkdTeacher")
        s = self.input_size
        pixels = torch.zeros(len(images), 3, s, s)
        affine = torch.zeros(len(images), 4)
        for i, img in enumerate(images):
            canvas, aff = letterbox(img, s)
            pixels[i] = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))).float().div_(255.0)
            affine[i] = torch.tensor(aff, dtype=torch.float32)
        valid = torch.full((len(images), 2), s, dtype=torch.long)
        return TeacherBatch(pixels=pixels, affine=affine, valid_hw=valid)

    @torch.no_grad()
    def preprocess_crops(self, images: torch.Tensor, boxes: torch.Tensor) -> TeacherBatch:
        """Live preprocessing: the whole student canvas ``(B, 3, H, W)`` in [0, 1] IS the input (resized to
        ``(S, S)`` only when ``(H, W)`` differs). ``affine`` (crop pixels -> teacher pixels) = ``(kx, ky,
        kx * x1, ky * y1)`` with ``kx = S / W``, ``ky = S / H`` (1 when the sizes agree), so the canvas ->
        teacher affine that :class:`OnlineTeacher` composes is ``(kx, ky, 0, 0)``: the identity for a
        student canvas of side ``S``. ``valid_hw`` = ``(S, S)``. All on ``images.device``."""
        clamped = crop_boxes(images, boxes)  # checks the shapes
        s, dev = self.input_size, images.device
        h, w = images.shape[-2:]
        pixels = unit_float(images)
        if (h, w) != (s, s):
            pixels = F.interpolate(pixels, size=(s, s), mode="bilinear", align_corners=False,
                                   antialias=bool(h > s or w > s)).clamp_(0, 1)
        kx, ky = s / w, s / h
        origin = torch.tensor([[x1, y1] for x1, y1, _, _ in clamped], dtype=torch.float32)
        affine = torch.cat([torch.tensor([[kx, ky]], dtype=torch.float32).expand(len(clamped), 2),
                            origin * torch.tensor([kx, ky], dtype=torch.float32)], dim=1)
        valid = torch.full((len(clamped), 2), s, dtype=torch.long)
        return TeacherBatch(pixels=pixels.contiguous(), affine=affine.to(dev), valid_hw=valid.to(dev))

    # ------------------------------------------------------------------ forward
    def _check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.input_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"VfmkdTeacher expects pixels (B, 3, {s}, {s}), got {tuple(pixels.shape)}.")

    @torch.no_grad()
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` in [0, 1] -> the backbone levels ``{name: (B, C, S/stride, S/stride)}`` float32."""
        self._check_pixels(pixels)
        with self.autocast():
            feats = self.model.backbone(self.model.prepare_input(pixels.to(self.device)))
        return {k: v.float() for k, v in feats.items()}

    @torch.no_grad()
    def forward_with_heads(self, pixels: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """``(backbone levels, {head name: raw training-form output})`` of one pass. The model stays in
        eval mode (BatchNorm running statistics); ultralytics' ``Detect`` modules (and subclasses such as
        ``Segment``) choose their OUTPUT FORM from ``self.training``, so exactly those modules have the flag
        raised for the pass and get it back afterwards: they return the dict ``v8DetectionLoss`` /
        ``v8SegmentationLoss`` read (``boxes``, ``scores``, ``feats``, ...), not the decoded tuple. Floating
        tensors come back as float32."""
        self._check_pixels(pixels)
        detects = [m for m in self.model.heads.modules() if isinstance(m, Detect)]
        try:
            for m in detects:
                m.training = True
            with self.autocast():
                feats = self.model.backbone(self.model.prepare_input(pixels.to(self.device)))
                fused = self.model.neck(feats)
                heads = {name: head(fused) for name, head in self.model.heads.items()}
        finally:
            for m in detects:
                m.training = False
        return {k: v.float() for k, v in feats.items()}, _float32(heads)
