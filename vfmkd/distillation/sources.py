"""Where each teacher's targets come from in a run: its cache, its live model, or both (mixed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from vfmkd.core.config import teacher_kwargs
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import TEACHERS
from vfmkd.distillation.offline import OfflineTeacher, open_offline_teacher
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

    def can_go_online(self, offline_ratio: float, augment: Any, missing_cache: str) -> Tuple[bool, str]:
        """Whether any batch of this run may need a live pass, and why."""
        if not self.offline:
            return True, "offline: false"
        if offline_ratio < 1.0:
            return True, f"offline_ratio={offline_ratio}"
        if augment is not None and augment.degrees > 0:
            return True, "rotation augmentation has no offline path"
        if augment is not None and augment.fliplr > 0 and not (self.cache and self.cache.has_flip):
            return True, "flip augmentation and the cache has no flipped pass"
        if missing_cache == "online":
            return True, "distillation.missing_cache=online"
        return False, ""


def build_teacher_sources(
    teachers_cfg: Mapping[str, Mapping[str, Any]],
    dataset: str,
    split: str,
    offline_ratio: float,
    augment: Any,
    missing_cache: str,
    device: torch.device,
) -> Dict[str, TeacherSource]:
    """Open the caches of offline teachers (fingerprint-checked) and load the live models that
    this run can need; log which teacher runs how."""
    log = get_logger()
    sources: Dict[str, TeacherSource] = {}
    for name, entry in teachers_cfg.items():
        if not entry.get("enabled", True):
            continue
        offline = bool(entry.get("offline", True))
        src = TeacherSource(name, dict(entry), offline)
        if offline:
            src.cache = open_offline_teacher(name, entry, dataset, split)
            src.specs, src.primary_feature, src.stats = src.cache.feature_specs, src.cache.primary_feature, dict(src.cache.stats)
        needed, why = src.can_go_online(offline_ratio, augment, missing_cache)
        if needed:
            kwargs = teacher_kwargs(entry)
            teacher = TEACHERS.build(entry["type"], where=f"teachers.{name}", **kwargs)
            if src.cache is not None and teacher.input_size != src.cache.input_size:
                raise ConfigError(f"teachers.{name}: live input_size {teacher.input_size} != cached {src.cache.input_size}")
            src.online = OnlineTeacher(name, teacher, device)
            if not src.specs:
                src.specs = tuple(teacher.feature_specs())
                src.primary_feature = teacher.primary_feature or src.specs[-1].name
            log.info("teacher %s: live model loaded (%s)", name, why)
        else:
            log.info("teacher %s: cached features only; the model is not loaded", name)
        sources[name] = src
    return sources
