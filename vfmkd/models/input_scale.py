"""The student's input scale. ``model.resolution_distill`` (DSRL) has two modes: ``single`` makes the
student see its canvas downsized by ``sr_target_scale`` (train and inference); ``dual`` trains the
student on the canvas and on the downsized canvas with shared weights and infers on the canvas.
``model.infer_scale`` picks the inference input (canvas x infer_scale, e.g. 0.5: the fast path).
This module owns those decisions and their geometry rule, so every place that builds a student from a
``model`` section (trainer, tester, exporter, a trained run used as a ``vfmkd`` teacher) gets the same
network: :meth:`UnifiedModel.from_config` reads the scale from here (:func:`training_input_scale` for
the trainer, :func:`configured_input_scale` elsewhere).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn.functional as F

from vfmkd.core.errors import ConfigError

#: Scales suggested when a canvas size does not divide (any value in (1, 4] is accepted).
TRY_SCALES = (1.2, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def resolution_distill_settings(model_cfg: Any) -> Dict[str, Any]:
    """``model.resolution_distill`` as a plain dict ({} when absent), from a ModelConfig or a mapping."""
    rd = getattr(model_cfg, "resolution_distill", None) if not isinstance(model_cfg, Mapping) \
        else model_cfg.get("resolution_distill")
    if rd is None:
        return {}
    return dict(rd) if isinstance(rd, Mapping) else dict(vars(rd))


def resolution_mode(model_cfg: Any) -> str:
    """``single`` or ``dual`` when resolution distillation is enabled, else ''."""
    rd = resolution_distill_settings(model_cfg)
    return str(rd.get("mode") or "single") if rd.get("enabled") else ""


def training_input_scale(model_cfg: Any) -> float:
    """The factor the trained student's input is divided by: ``sr_target_scale`` in single mode, else 1
    (dual trains the full-resolution path; its low path is the training step's second pass)."""
    return float(resolution_distill_settings(model_cfg)["sr_target_scale"]) \
        if resolution_mode(model_cfg) == "single" else 1.0


def configured_input_scale(model_cfg: Any) -> float:
    """The factor a student built for inference divides its input by: 1 / ``model.infer_scale`` when set,
    else the trained path's (:func:`training_input_scale`: dual and no DSRL 1, single ``sr_target_scale``)."""
    infer = model_cfg.get("infer_scale") if isinstance(model_cfg, Mapping) else getattr(model_cfg, "infer_scale", None)
    return 1.0 / float(infer) if infer is not None else training_input_scale(model_cfg)


def check_input_geometry(img_size: int, scale: float, max_stride: int, where: str = "model.resolution_distill",
                         size_key: str = "data.img_size") -> int:
    """The student's input size s = S / scale; refuses an s smaller than one cell of the student's
    coarsest level, and an s that is not an integer multiple of the student's largest stride (its levels
    would not be whole grids, the neck's x2 upsamplings would not line up and the finest level,
    upsampled by its stride x scale, would not land on S)."""
    s = img_size / scale
    if abs(s - round(s)) < 1e-6 and round(s) % max_stride == 0 and round(s) > 0:
        return int(round(s))
    if s < max_stride:
        raise ConfigError(
            f"{where}: {size_key} {img_size} / scale {scale:g} = {s:.4g} pixels is smaller than one cell of the "
            f"student's coarsest level (stride {max_stride}): that level would have no cell. Raise {size_key} to at "
            f"least {int(-(-max_stride * scale // 32) * 32)} or use a scale of at most {img_size / max_stride:g} "
            f"(sr_target_scale, or model.infer_scale of at least {max_stride / img_size:g}).")
    ok = [f"{k:g} ({img_size / k:g})" for k in TRY_SCALES
          if abs(img_size / k - round(img_size / k)) < 1e-6 and round(img_size / k) % max_stride == 0]
    sizes = [n for n in range(128, 4097, 32)
             if abs(n / scale - round(n / scale)) < 1e-6 and round(n / scale) % max_stride == 0][:3]
    raise ConfigError(
        f"{where}: {size_key} {img_size} / sr_target_scale {scale:g} = {s:.4g} is not a multiple of the student's "
        f"largest stride {max_stride}: its levels cannot be upsampled to the {img_size}-pixel SR target (the level "
        f"grids would not be whole and the neck's x2 upsamplings would not line up). Scales that work at {size_key} "
        f"{img_size}: {', '.join(ok) or 'none in ' + str(TRY_SCALES)}; {size_key} values that work with {scale:g}: "
        f"{', '.join(map(str, sizes)) or 'none up to 4096'}.")


def downscaled_size(height: Any, width: Any, scale: float) -> Tuple[Any, Any]:
    """(round(H / scale), round(W / scale)), halves rounded up: the student's input size under DSRL.
    Integer arithmetic on ``scale`` as a fraction p/q, so the same code gives Python ints eagerly and
    stays in the graph when traced (``torch.jit.trace`` / the ONNX exporter hand the sizes over as
    tensors; a float and ``int()`` would freeze the traced size). Equal to ``int(n / scale + 0.5)`` for
    every size :func:`check_input_geometry` accepts."""
    frac = Fraction(scale).limit_denominator(1000)
    p, q = frac.numerator, frac.denominator
    return (2 * height * q + p) // (2 * p), (2 * width * q + p) // (2 * p)


def downscale_input(images: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H', W') resized by 1 / ``scale`` (:func:`downscaled_size`, bilinear); the
    input itself when ``scale`` is 1. No gradient: the downscaled image is data, not a prediction."""
    if scale == 1.0:
        return images
    with torch.no_grad():
        return F.interpolate(images, size=downscaled_size(images.shape[-2], images.shape[-1], scale),
                             mode="bilinear", align_corners=False)


def check_model_input(model: Any, img_size: int, where: str, size_key: str) -> int:
    """Refuse an input size ``model`` (a UnifiedModel) cannot take: under DSRL :func:`check_input_geometry`
    at its ``input_scale``, else a positive multiple of its largest stride. Returns the student's size."""
    scale = float(getattr(model, "input_scale", 1.0))
    stride = int(max(s.stride for s in [*model.backbone.feature_specs(), *model.neck.feature_specs()]))
    if scale != 1.0 and img_size > 0:
        return check_input_geometry(int(img_size), scale, stride, where=where, size_key=size_key)
    if img_size <= 0 or img_size % stride:
        lo = max(img_size, 0) // stride * stride
        raise ConfigError(f"{where}: {size_key} {img_size} must be a positive multiple of {stride} (the student's "
                          f"largest stride); nearest valid: {f'{lo} or {lo + stride}' if lo else stride}")
    return int(img_size)
