"""Cached teachers: features written once by tools/prepare_teacher_features.py, read back per image."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

import torch

from vfmkd.cache.reader import FeatureCacheReader
from vfmkd.core.errors import CacheMismatchError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.fingerprint import TeacherFingerprint
from vfmkd.utils.logging import get_logger


class CacheMissingError(CacheMismatchError):
    """No cache file exists for the split (the message names the command that writes it)."""


@dataclass(frozen=True)
class OfflineTeacher:
    """One teacher's cache of one split, opened and fingerprint-checked once.

    ``reader`` serves per-image entries (also in DataLoader workers: it opens its HDF5 handle per
    process); ``stats`` holds the per-channel (mean, std) of each map measured at cache time.
    """

    name: str
    reader: FeatureCacheReader
    feature_specs: Tuple[FeatureSpec, ...]
    primary_feature: str
    input_size: int
    has_flip: bool  # a second, mirrored teacher pass is cached (--with-flip)
    stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    #: box-prompted mask logits are cached for every image (--outputs features,masks), in each cached pass
    has_masks: bool = False

    @property
    def path(self) -> Path:
        return self.reader.path

    def masks_command(self, data_root: Optional[str] = None, limit: Optional[int] = None) -> str:
        """The tool command that adds mask logits to this cache (``--outputs features,masks``: it reopens the
        file, adds the mask datasets and fills them, resumably)."""
        return self.reader.rebuild_command(data_root, limit=limit, masks=True)

    def require_masks(self, why: str, data_root: Optional[str] = None, limit: Optional[int] = None) -> None:
        """Raise CacheMismatchError naming :meth:`masks_command` unless the cache holds mask logits;
        ``why`` names what needs them (e.g. ``loss 'mask_kd' (mask_distill)``)."""
        if self.has_masks:
            return
        partial = self.reader.mask_info is not None
        raise CacheMismatchError(
            f"teacher '{self.name}': {why} needs the teacher's mask logits but {self.path} "
            f"{'does not hold them for every image yet' if partial else 'caches features only'}. "
            f"{'Finish' if partial else 'Add'} them with:\n  {self.masks_command(data_root, limit)}")

    def check_mask_labels(self, label_dir: str | Path) -> None:
        """Raise CacheMismatchError naming the rebuild command when the detection label files the cached
        mask logits were prompted with changed since (sha256 over the cache's images)."""
        try:
            self.reader.check_labels(label_dir)
        except CacheMismatchError as exc:
            raise CacheMismatchError(f"teacher '{self.name}': {exc}") from exc

    def missing_images(self, image_ids: Sequence[str], orig_sizes: Sequence[Tuple[int, int]], allow_missing: bool,
                       data_root: Optional[str] = None, limit: Optional[int] = None) -> FrozenSet[str]:
        """The ids of ``image_ids`` the cache lacks (only allowed with ``allow_missing``); raises when
        the cache was built for other images or an image changed size since."""
        reader, where = self.reader, f"teacher '{self.name}'"
        missing = reader.missing_ids(image_ids)
        if missing:
            cmd = reader.rebuild_command(data_root, limit=limit)
            head = (f"{where}: {len(missing)} of {len(image_ids)} images of {reader.attrs.get('split', '?')} are "
                    f"missing from {reader.path} (e.g. {', '.join(missing[:3])}).")
            if allow_missing:
                get_logger().warning("%s They go to the live teacher (distillation.missing_cache=online). Complete the "
                                     "cache with:\n  %s", head, cmd)
            elif reader.image_ids == list(image_ids):  # same list, unfinished: the tool resumes it
                raise CacheMismatchError(f"{head} Finish the cache with:\n  {cmd}")
            else:
                raise CacheMismatchError(
                    f"{head} It was built for another image list ({len(reader.image_ids)} images, e.g. another "
                    f"--limit): delete {reader.path} (or pick another --output) and run:\n  {cmd}")
        absent = set(missing)
        for image_id, hw in zip(image_ids, orig_sizes):
            if image_id in absent:
                continue
            cached = tuple(int(v) for v in reader.orig_hw[reader.index_of(image_id)])
            if cached != tuple(hw):
                raise CacheMismatchError(
                    f"{where}: image {image_id} is {hw[0]}x{hw[1]} but {reader.path} cached it at "
                    f"{cached[0]}x{cached[1]}; the image changed. Delete {reader.path} and rebuild:\n  "
                    f"{reader.rebuild_command(data_root, limit=limit)}")
        return frozenset(absent)


@dataclass(frozen=True)
class OfflineCacheSpec:
    """One teacher's cache of one split, as the builders read it from the teacher's config entry.

    ``fingerprint``: the configured teacher's config fingerprint (the cache must match it);
    ``rebuild``: the command that writes the file (named when it is absent); ``teacher_type`` and
    ``teacher_settings`` (its constructor settings) spell the rebuild command of a mismatching cache;
    ``label_dir``: the split's detection label folder, checked against a cache with mask logits."""

    name: str
    path: Path
    fingerprint: TeacherFingerprint
    primary_feature: str
    rebuild: str
    teacher_type: str
    teacher_settings: Mapping[str, Any]
    label_dir: Optional[Path] = None


def open_offline_teacher(spec: OfflineCacheSpec) -> OfflineTeacher:
    """Open ``spec.path`` (a ``<split>.h5``) and check it was written by the teacher whose config
    fingerprint is ``spec.fingerprint``; a cache with mask logits is checked against ``spec.label_dir``
    (stale labels raise :class:`CacheMismatchError`)."""
    name, path, expected = spec.name, spec.path, spec.fingerprint
    where = f"teachers.{name}"
    if not path.is_file():
        raise CacheMissingError(f"{where}: no cached features at {path}. Write them first:\n  {spec.rebuild}")
    reader = FeatureCacheReader(path, rebuild=spec.rebuild)
    ignore: Tuple[str, ...] = ()
    if expected.weights.startswith("unknown"):
        # The checkpoint is not on this machine (a cache copied from elsewhere): the weights
        # cannot be compared, everything else still is.
        get_logger().warning("%s: %s; trusting the cache's weights (%s)", where, expected.weights,
                             reader.fingerprint.weights)
        ignore = ("weights",)
    try:
        reader.check_matches(expected, ignore=ignore,
                             teacher_config={"type": spec.teacher_type, **spec.teacher_settings})
    except CacheMismatchError as exc:
        raise CacheMismatchError(f"{where}: {exc}") from exc
    if spec.label_dir is not None:
        try:
            reader.check_labels(spec.label_dir)
        except CacheMismatchError as exc:
            raise CacheMismatchError(f"{where}: {exc}") from exc
    maps = tuple(reader.feature_specs)
    names = [m.name for m in maps]
    stats = {m.name: reader.stats(m.name) for m in maps}
    return OfflineTeacher(
        name, reader, maps, spec.primary_feature if spec.primary_feature in names else names[-1], reader.input_size,
        bool(reader.has_flip), {k: v for k, v in stats.items() if v is not None}, bool(reader.has_masks),
    )
