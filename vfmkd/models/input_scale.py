"""The student's input scale: DSRL (``model.resolution_distill``) makes the student see its canvas
downsized by ``sr_target_scale``. This module owns that decision and its geometry rule, so every place
that builds a student from a ``model`` section (trainer, tester, exporter, a trained run used as a
``vfmkd`` teacher) gets the same network: :meth:`UnifiedModel.from_config` reads the scale from here.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from vfmkd.core.errors import ConfigError

#: Head tasks that answer in input pixels (decoded boxes, prototype grids): under DSRL they are built
#: with the levels' strides in canvas pixels, so their boxes and prototypes stay in the canvas frame
#: and they train and score alongside the low-resolution segmentation path.
CANVAS_STRIDE_TASKS = ("detection", "instance")
#: Scales suggested when a canvas size does not divide (any value in (1, 4] is accepted).
TRY_SCALES = (1.2, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def resolution_distill_settings(model_cfg: Any) -> Dict[str, Any]:
    """``model.resolution_distill`` as a plain dict ({} when absent), from a ModelConfig or a mapping."""
    rd = getattr(model_cfg, "resolution_distill", None) if not isinstance(model_cfg, Mapping) \
        else model_cfg.get("resolution_distill")
    if rd is None:
        return {}
    return dict(rd) if isinstance(rd, Mapping) else dict(vars(rd))


def configured_input_scale(model_cfg: Any) -> float:
    """The factor the student's input is divided by: ``sr_target_scale`` when DSRL is enabled, else 1."""
    rd = resolution_distill_settings(model_cfg)
    return float(rd["sr_target_scale"]) if rd.get("enabled") else 1.0


def check_input_geometry(img_size: int, scale: float, max_stride: int, where: str = "model.resolution_distill",
                         size_key: str = "data.img_size") -> int:
    """The student's input size s = S / scale; refuses an s that is not an integer multiple of the
    student's largest stride (its levels would not be whole grids, the neck's x2 upsamplings would
    not line up and the finest level, upsampled by its stride x scale, would not land on S)."""
    s = img_size / scale
    if abs(s - round(s)) < 1e-6 and round(s) % max_stride == 0 and round(s) > 0:
        return int(round(s))
    ok = [f"{k:g} ({img_size / k:g})" for k in TRY_SCALES
          if abs(img_size / k - round(img_size / k)) < 1e-6 and round(img_size / k) % max_stride == 0]
    sizes = [n for n in range(128, 4097, 32)
             if abs(n / scale - round(n / scale)) < 1e-6 and round(n / scale) % max_stride == 0][:3]
    raise ConfigError(
        f"{where}: {size_key} {img_size} / sr_target_scale {scale:g} = {s:.4g} is not a multiple of the student's "
        f"largest stride {max_stride}: its levels cannot be upsampled to the {img_size}-pixel SR target (the level grids "
        f"would not be whole and the neck's x2 upsamplings would not line up). Scales that work at {size_key} {img_size}: "
        f"{', '.join(ok) or 'none in ' + str(TRY_SCALES)}; {size_key} values that work with {scale:g}: "
        f"{', '.join(map(str, sizes)) or 'none up to 4096'}.")
