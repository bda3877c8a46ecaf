"""Offline teachers: features come from the HDF5 cache written by tools/prepare_teacher_features.py."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

from vfmkd.core.config import component_kwargs, resolve_path
from vfmkd.core.errors import CacheMismatchError, ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import TEACHERS
from vfmkd.datasets.feature_cache import FeatureCacheReader
from vfmkd.utils.logging import get_logger

# Keys of a teacher entry that describe how vfmkd uses the teacher, not how to build it.
TEACHER_USAGE_KEYS = ("enabled", "offline", "feature_path")


@dataclass(frozen=True)
class OfflineTeacher:
    """A cached teacher: where its split files are and what maps they hold."""

    name: str
    feature_dir: Path
    feature_specs: Tuple[FeatureSpec, ...]
    primary_feature: str
    input_size: int

    def split_file(self, split: str) -> Path:
        return self.feature_dir / f"{split}.h5"


def teacher_kwargs(entry: Mapping[str, Any]) -> Dict[str, Any]:
    return component_kwargs(entry, reserved=TEACHER_USAGE_KEYS)


def cache_command(entry: Mapping[str, Any], dataset: str, feature_dir: str) -> str:
    """The exact command that writes the cache this teacher entry expects."""
    overrides = [f"teacher.{k}={v}" for k, v in teacher_kwargs(entry).items() if v is not None]
    return " ".join(
        ["python tools/prepare_teacher_features.py", f"--teacher {entry['type']}", f"--dataset {dataset}",
         f"--output {shlex.quote(str(feature_dir))}", *map(shlex.quote, overrides)]
    )


def open_offline_teacher(name: str, entry: Mapping[str, Any], dataset: str, split: str) -> OfflineTeacher:
    """Check that the cache of ``split`` exists and was written by the configured teacher."""
    where = f"teachers.{name}"
    if not entry.get("feature_path"):
        raise ConfigError(f"{where}: offline: true needs feature_path (the --output of prepare_teacher_features.py)")
    feature_dir = resolve_path(entry["feature_path"])
    path = feature_dir / f"{split}.h5"
    command = cache_command(entry, dataset, entry["feature_path"])
    if not path.is_file():
        raise CacheMismatchError(
            f"{where}: no cached features at {path}. Write them first:\n  {command} --splits {split}"
        )
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
        reader.check_matches(expected, ignore=ignore)
    except CacheMismatchError as exc:
        raise CacheMismatchError(f"{where}: {exc}\nRebuild it for this teacher with:\n  {command} --splits {split}") from exc
    specs = tuple(reader.feature_specs)
    return OfflineTeacher(name, feature_dir, specs, teacher_cls.primary_feature_of(specs), reader.input_size)
