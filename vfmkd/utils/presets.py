"""Memory presets (``configs/presets/NAME.yaml``): named combinations of the memory and speed levers,
chosen with ``--preset NAME`` or ``train.preset: NAME``; ``auto`` picks one from the visible GPU.

A preset sets only levers, never what the experiment is (its teachers, student, data, losses), so
the order is: the experiment file < the preset < the shortcut flags < ``key=value`` overrides. A
lever that an override sets is left to the override (the micro-batch pair as a whole). The levers:

* ``teacher.max_input_size``: a live teacher (``offline: false``) above this size runs at it, rounded
  down to its family's size rule. Cached teachers keep theirs (the cache fixes size and precision),
  and a ``vfmkd`` teacher sees the student's own canvas, so neither is touched.
* ``teacher.device``: where live teachers run (every teacher type that takes a ``device``).
* ``max_micro_batch``: ``data.batch_size`` x ``train.accumulate`` is kept, the micro-batch becomes
  its largest divisor not above this.
* ``set``: plain experiment keys, only those in :data:`LEVER_KEYS`.

The teacher registry must be filled (``import vfmkd.teachers``; the tools do, through the engine).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from vfmkd.core.config import REPO_ROOT, read_yaml, teacher_kwargs
from vfmkd.core.errors import ConfigError, did_you_mean
from vfmkd.core.registry import TEACHERS

PRESET_DIR = REPO_ROOT / "configs" / "presets"
AUTO = "auto"
# Cut-offs on the bytes torch reports (decimal): a "24 GB" RTX 4090 reports ~25.4e9 and a 32 GB V100
# ~34e9, so 30e9 separates them; a "16 GB" T4 reports ~15.8e9 (V100-16 ~16.9e9), a 12 GB card ~12.6e9.
AUTO_CUTOFFS: Tuple[Tuple[float, str], ...] = ((30e9, "gpu_24g_plus"), (15e9, "gpu_16g"), (0.0, "gpu_8g"))
CPU_PRESET = "cpu"
LEVER_KEYS = ("distillation.distill_interval", "model.resolution_distill.enabled",
              "model.resolution_distill.use_low_res_sr", "train.amp")
TEACHER_LEVERS = ("max_input_size", "device")
BATCH_KEYS = ("data.batch_size", "train.accumulate")


@dataclass(frozen=True)
class Preset:
    """One preset file, checked."""

    name: str
    description: str = ""
    max_input_size: Optional[int] = None
    teacher_device: Optional[str] = None
    max_micro_batch: Optional[int] = None
    set: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """One lever a preset moves: ``key`` (dotted) from ``old`` to ``new``."""

    key: str
    old: Any
    new: Any


def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def auto_preset() -> Tuple[str, str]:
    """``(preset, why)`` for ``auto``: by the total memory of the first visible GPU, ``cpu`` without CUDA."""
    if not torch.cuda.is_available():
        return CPU_PRESET, "no CUDA GPU visible"
    props = torch.cuda.get_device_properties(0)
    total = float(props.total_memory)
    name = next(preset for floor, preset in AUTO_CUTOFFS if total >= floor)
    return name, f"{props.name}, {total / 1e9:.1f} GB"


def load_preset(name: str) -> Preset:
    """The preset ``configs/presets/NAME.yaml``; ConfigError listing the presets for another name or a bad key."""
    known = preset_names()
    if name not in known:
        raise ConfigError(f"unknown preset '{name}'.{did_you_mean(name, known)} Presets (configs/presets/*.yaml): "
                          f"{', '.join(known)}, or auto (picked from the GPU's memory).")
    path = PRESET_DIR / f"{name}.yaml"
    raw = read_yaml(path)
    extra = sorted(set(raw) - {"description", "teacher", "max_micro_batch", "set"})
    teacher = raw.get("teacher") or {}
    extra += [f"teacher.{k}" for k in teacher if k not in TEACHER_LEVERS]
    extra += [f"set.{k}" for k in (raw.get("set") or {}) if k not in LEVER_KEYS]
    if extra:
        raise ConfigError(f"{path}: {', '.join(extra)} is not a preset lever; a preset takes description, "
                          f"teacher.{{{', '.join(TEACHER_LEVERS)}}}, max_micro_batch and "
                          f"set.{{{', '.join(LEVER_KEYS)}}}.")
    for key, value in (("teacher.max_input_size", teacher.get("max_input_size")),
                       ("max_micro_batch", raw.get("max_micro_batch"))):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{path}: {key} must be a positive integer, got {value!r}")
    return Preset(name=name, description=str(raw.get("description", "")), max_input_size=teacher.get("max_input_size"),
                  teacher_device=teacher.get("device"), max_micro_batch=raw.get("max_micro_batch"),
                  set=dict(raw.get("set") or {}))


def resolve_preset(name: str) -> Tuple[Preset, str]:
    """``(preset, how it was chosen)``, ``auto`` resolved."""
    if name == AUTO:
        chosen, why = auto_preset()
        return load_preset(chosen), f"auto: {why}"
    return load_preset(name), "asked for"


def preset_changes(preset: Preset, cfg: Dict[str, Any], overridden: Sequence[str] = ()) -> List[Change]:
    """The levers ``preset`` moves in the resolved experiment ``cfg``, minus those under ``overridden``
    dotted keys (the command line's ``key=value`` overrides, which win)."""
    dsrl = "model.resolution_distill."
    dsrl_on = preset.set.get(dsrl + "enabled", cfg["model"]["resolution_distill"]["enabled"])
    changes = [Change(k, OmegaConf.select(OmegaConf.create(cfg), k), v) for k, v in preset.set.items()
               if dsrl_on or not k.startswith(dsrl) or k == dsrl + "enabled"]  # DSRL's levers only where it runs
    changes += _teacher_changes(preset, cfg["teachers"])
    batch = _batch_changes(preset.max_micro_batch, cfg["data"]["batch_size"], cfg["train"]["accumulate"])
    if not any(_covers(o, k) for o in overridden for k in BATCH_KEYS):
        changes += batch
    return [c for c in changes if c.old != c.new and not any(_covers(o, c.key) for o in overridden)]


def with_changes(raw: Dict[str, Any], changes: Sequence[Change]) -> Dict[str, Any]:
    """The experiment mapping ``raw`` (as read, before resolution) with the changes applied; ``raw`` is left as is."""
    cfg = OmegaConf.create(copy.deepcopy(raw))
    for change in changes:
        OmegaConf.update(cfg, change.key, change.new, merge=True)
    out = OmegaConf.to_container(cfg)
    assert isinstance(out, dict)
    return out


def _covers(override: str, key: str) -> bool:
    return key == override or key.startswith(override + ".")


def _batch_changes(max_micro: Optional[int], batch: int, accumulate: int) -> List[Change]:
    if max_micro is None or batch <= max_micro:
        return []
    effective = batch * accumulate
    micro = max(d for d in range(1, max_micro + 1) if effective % d == 0)
    return [Change("data.batch_size", batch, micro), Change("train.accumulate", accumulate, effective // micro)]


def _teacher_changes(preset: Preset, teachers: Dict[str, Dict[str, Any]]) -> List[Change]:
    changes = []
    for name, entry in teachers.items():
        if not entry.get("enabled", True) or entry.get("offline", True):
            continue  # a cached teacher's size and precision are its cache's
        cls = TEACHERS.get(entry["type"])
        params = inspect.signature(cls).parameters
        if preset.teacher_device is not None and "device" in params:
            changes.append(Change(f"teachers.{name}.device", entry.get("device", params["device"].default),
                                  preset.teacher_device))
        if preset.max_input_size is not None and "input_size" in params and not getattr(cls, "live_only", False):
            size = entry.get("input_size", params["input_size"].default)
            if size > preset.max_input_size:
                changes.append(Change(f"teachers.{name}.input_size", size,
                                      _capped_size(cls, entry, preset.max_input_size)))
    return changes


def _capped_size(cls: Any, entry: Dict[str, Any], cap: int) -> int:
    """``cap`` rounded down to the teacher family's input-size rule (SAM 16, SAM2 32, DINOv2 14)."""
    settings = cls.settings_from(**teacher_kwargs(entry))
    multiple = cls._input_multiple(settings)[0]  # the family's own rule (BaseTeacher._input_multiple)
    return max(multiple, cap // multiple * multiple)


def describe(preset: Preset, why: str, changes: Sequence[Change]) -> str:
    """The one log line of a run's preset."""
    moved = ", ".join(f"{c.key} {c.old} -> {c.new}" for c in changes) or "nothing to change in this experiment"
    return f"preset {preset.name} ({preset.description}; {why}): {moved}"


def frozen_keys(overrides: Sequence[str]) -> FrozenSet[str]:
    """The dotted keys ``key=value`` overrides set (``+key=value`` too)."""
    return frozenset(o.lstrip("+").partition("=")[0].strip() for o in overrides)
