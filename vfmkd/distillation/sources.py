"""Where each teacher's targets come from in a run: its cache, its live model, or both (mixed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from vfmkd.core.config import teacher_kwargs
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import TEACHERS
from vfmkd.distillation.offline import CacheMissingError, OfflineTeacher, open_offline_teacher
from vfmkd.distillation.online import OnlineTeacher
from vfmkd.utils.logging import get_logger


@dataclass
class TeacherSource:
    """One enabled teacher: ``cache`` when it has cached features, ``online`` when a live pass can
    occur in this run (the model is loaded only then)."""

    name: str
    entry: Dict[str, Any]
    offline: bool
    cache: Optional[OfflineTeacher] = None
    online: Optional[OnlineTeacher] = None
    specs: Tuple[FeatureSpec, ...] = ()
    primary_feature: str = ""
    stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def can_go_online(self, offline_ratio: float, augment: Any, images_missing: bool) -> Tuple[bool, str]:
        """Whether any batch of this run may need a live pass, and why."""
        if not self.offline:
            return True, "offline: false"
        if self.cache is None:
            return True, "no cache (distillation.missing_cache=online)"
        if offline_ratio < 1.0:
            return True, f"offline_ratio={offline_ratio}"
        if augment is not None and augment.degrees > 0:
            return True, "rotation augmentation has no offline path"
        if augment is not None and augment.fliplr > 0 and not self.cache.has_flip:
            return True, "flip augmentation and the cache has no flipped pass"
        if augment is not None and (augment.scale > 0 or augment.translate > 0):
            return True, "scale/translate views beyond distillation.offline_max_shift go live"
        if images_missing:
            return True, "images missing from the cache (distillation.missing_cache=online)"
        return False, ""

    def load_live_model(self, device: torch.device, why: str) -> None:
        teacher = TEACHERS.build(self.entry["type"], where=f"teachers.{self.name}", **teacher_kwargs(self.entry))
        if self.cache is not None and teacher.input_size != self.cache.input_size:
            raise ConfigError(f"teachers.{self.name}: live input_size {teacher.input_size} != cached {self.cache.input_size}")
        self.online = OnlineTeacher(self.name, teacher, device)
        if not self.specs:
            self.specs = tuple(teacher.feature_specs())
            self.primary_feature = teacher.primary_feature or self.specs[-1].name
        get_logger().info("teacher %s: live model loaded (%s)", self.name, why)


def open_teacher_sources(
    teachers_cfg: Mapping[str, Mapping[str, Any]], dataset: str, split: str, missing_cache: str
) -> Dict[str, TeacherSource]:
    """The enabled teachers with their caches opened and fingerprint-checked (no models loaded)."""
    sources: Dict[str, TeacherSource] = {}
    for name, entry in teachers_cfg.items():
        if not entry.get("enabled", True):
            continue
        src = TeacherSource(name, dict(entry), bool(entry.get("offline", True)))
        if src.offline:
            try:
                src.cache = open_offline_teacher(name, entry, dataset, split)
            except CacheMissingError as exc:
                if missing_cache != "online":
                    raise
                get_logger().warning("%s\nAll its batches go to the live teacher (distillation.missing_cache=online).", exc)
        if src.cache is not None:
            src.specs, src.primary_feature, src.stats = src.cache.feature_specs, src.cache.primary_feature, dict(src.cache.stats)
        sources[name] = src
    return sources


def load_live_models(sources: Mapping[str, TeacherSource], offline_ratio: float, augment: Any,
                     missing: Mapping[str, Any], device: torch.device) -> None:
    """Load each teacher's model only if a live pass can occur in this run."""
    for name, src in sources.items():
        needed, why = src.can_go_online(offline_ratio, augment, bool(missing.get(name)))
        if needed:
            src.load_live_model(device, why)
        else:
            get_logger().info("teacher %s: cached features only; the model is not loaded", name)
