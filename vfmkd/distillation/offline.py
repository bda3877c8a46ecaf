"""Offline teachers: features come from the HDF5 cache written by tools/prepare_teacher_features.py."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch

from vfmkd.core.config import resolve_path, teacher_kwargs
from vfmkd.core.errors import CacheMismatchError, ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import TEACHERS
from vfmkd.datasets.feature_cache import FeatureCacheReader, rebuild_command
from vfmkd.utils.logging import get_logger



class CacheMissingError(CacheMismatchError):
    """No cache file exists for the split (the message names the command that writes it)."""


@dataclass(frozen=True)
class OfflineTeacher:
    """A cached teacher: where its split files are and what maps they hold."""

    name: str
    feature_dir: Path
    feature_specs: Tuple[FeatureSpec, ...]
    primary_feature: str
    input_size: int
    has_flip: bool  # a second, mirrored teacher pass is cached (--with-flip)
    stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # feature -> per-channel (mean, std) measured at cache time

    def split_file(self, split: str) -> Path:
        return self.feature_dir / f"{split}.h5"


def open_offline_teacher(name: str, entry: Mapping[str, Any], dataset: str, split: str) -> OfflineTeacher:
    """Check that the cache of ``split`` exists and was written by the configured teacher."""
    where = f"teachers.{name}"
    if not entry.get("feature_path"):
        raise ConfigError(f"{where}: offline: true needs feature_path (the --output of prepare_teacher_features.py)")
    feature_dir = resolve_path(entry["feature_path"])
    path = feature_dir / f"{split}.h5"
    if not path.is_file():
        command = rebuild_command(entry["type"], dataset, split, str(entry["feature_path"]), teacher_config=entry)
        raise CacheMissingError(f"{where}: no cached features at {path}. Write them first:\n  {command}")
    teacher_cls = TEACHERS.get(entry["type"])
    kwargs = teacher_kwargs(entry)
    TEACHERS.check_kwargs(entry["type"], kwargs, where)
    expected = teacher_cls.config_fingerprint(**kwargs)
    reader = FeatureCacheReader(path)
    ignore = ()
    if expected.weights.startswith("unknown"):
        # The checkpoint is not on this machine (a cache copied from elsewhere): the weights
        # cannot be compared, everything else still is.
        get_logger().warning("%s: %s; trusting the cache's weights (%s)", where, expected.weights, reader.fingerprint.weights)
        ignore = ("weights",)
    try:
        reader.check_matches(expected, ignore=ignore, teacher_config=entry)
    except CacheMismatchError as exc:
        raise CacheMismatchError(f"{where}: {exc}") from exc
    specs = tuple(reader.feature_specs)
    names = [s.name for s in specs]
    primary = teacher_cls.primary_feature if teacher_cls.primary_feature in names else names[-1]
    stats = {s.name: reader.stats(s.name) for s in specs}
    return OfflineTeacher(
        name, feature_dir, specs, primary, reader.input_size, bool(reader.has_flip),
        {k: v for k, v in stats.items() if v is not None},
    )
