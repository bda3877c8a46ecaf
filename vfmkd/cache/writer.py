"""Writes the HDF5 teacher-feature cache (layout: the feature_cache module docstring): creates a cache
or reopens one to resume it, under its :class:`CacheLock`, and the :class:`MaskPlan` of its mask logits.

Crash safety: all storage is allocated when the file is created, so a batch write only touches
raw data, never HDF5 metadata. Features are flushed before ``done`` is set and flushed again, so a
SIGKILL loses at most the batch in flight and never leaves a batch marked done with stale data.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

import vfmkd
from vfmkd.cache import codec
from vfmkd.cache.codec import FLIP_GROUPS as _FLIP
from vfmkd.cache.codec import (
    FORMAT_VERSIONS,
    MASK_GROUPS,
    alloc_dataset,
    bytes_per_image,
    layout_flags,
    stored_layout,
)
from vfmkd.cache.format import CacheWriteError, attr_value, fingerprint_differences
from vfmkd.cache.lock import CacheLock, CacheLockedError, make_cache_dir, reserve_space
from vfmkd.core.errors import CacheMismatchError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.fingerprint import TeacherFingerprint

LOGGER = logging.getLogger("vfmkd")
SPACE_MARGIN = 1.1, 1 << 20  # reserve bytes_per_image * N * 1.1 + 1 MiB before creating a cache
INDEX_ATTR = "shards"  # the attribute that makes a <split>.h5 an index over shard files (shards.py)


@dataclass(frozen=True)
class MaskPlan:
    """What the mask logits of a cache are prompted with, known before any teacher pass:
    ``cls`` per image (K_i,) int64 class ids of its label rows (row j = label_index j),
    ``prompt_source`` (e.g. ``detection-labels:object_detection/labels/train2017``) and
    ``labels_sha256`` (:func:`feature_cache.label_files_sha256` of those label files)."""

    cls: Tuple[np.ndarray, ...]
    prompt_source: str
    labels_sha256: str
    num_classes: int = 80  # what the label files were parsed with (named by the rebuild command)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(c) for c in self.cls])]).astype(np.int64)

    def info(self, side: int) -> Dict[str, Any]:
        return {"prompt_source": self.prompt_source, "labels_sha256": self.labels_sha256, "side": int(side),
                "count": int(self.offsets[-1]), "num_classes": int(self.num_classes)}


def _specs_json(specs: Sequence[FeatureSpec]) -> str:
    return json.dumps([{"name": s.name, "channels": s.channels, "stride": s.stride} for s in specs])


class FeatureCacheWriter:
    """Create, or reopen to resume, the cache of one teacher on one split's image list."""

    def __init__(
        self,
        path: str | Path,
        image_ids: Sequence[str],
        fingerprint: TeacherFingerprint,
        feature_specs: Sequence[FeatureSpec],
        input_size: int,
        *,
        teacher_config: Mapping[str, Any],
        dataset: str,
        split: str,
        batch_size: int,
        teacher: str = "",
        data_root: str = "",
        compression: Optional[str] = None,
        storage: str = "float16",
        with_flip: bool = False,
        extra_attrs: Optional[Mapping[str, Any]] = None,
        masks: Optional[MaskPlan] = None,
    ) -> None:
        """``masks``: also store box-prompted mask logits (see the feature_cache module docstring) for this plan."""
        self.path = Path(path)
        self.masks = masks
        if masks is not None and len(masks.cls) != len(image_ids):
            raise ValueError(f"mask plan for {len(masks.cls)} images, the cache holds {len(image_ids)}")
        self.mask_side = int(input_size) // 4
        self.image_ids = list(image_ids)
        self.specs = tuple(feature_specs)
        self.input_size = int(input_size)
        self.storage, self.with_flip = codec.check_storage(storage), bool(with_flip)
        names = {s.name for s in self.specs}
        if storage == "int8" and any(n + suffix in names for n in names for suffix in codec.SCALES.values()):
            raise ValueError(f"feature names {sorted(names)} collide with the int8 scale datasets '<name>_scale'")
        make_cache_dir(self.path.parent)
        self._lock = CacheLock(self.path)
        try:
            self._lock.acquire()
        except PermissionError as exc:
            raise CacheWriteError(exc.errno, f"cannot write the cache {self.path}: the folder {self.path.parent} is "
                                  f"not writable ({exc.strerror}); choose another --output") from exc
        try:
            self._open(fingerprint, compression, teacher_config, dataset, split, batch_size, teacher, data_root,
                       extra_attrs)
        except BaseException:
            self._lock.release()
            raise
        self.attrs: Dict[str, Any] = {k: attr_value(v) for k, v in self._file.attrs.items()}
        self.batch_size = int(self.attrs["batch_size"])
        self._offsets = self._file["masks/offsets"][:] if masks is not None else None

    def _open(self, fingerprint: TeacherFingerprint, compression: Optional[str], teacher_config: Mapping[str, Any],
              dataset: str, split: str, batch_size: int, teacher: str, data_root: str,
              extra_attrs: Optional[Mapping[str, Any]]) -> None:
        if self.path.exists():
            self._file = self._reopen(fingerprint)
            # also to files from before statistics
            codec.add_stats_datasets(self._file, self.specs, len(self.image_ids))
            if self.masks is not None and "masks" not in self._file.attrs:  # add mask logits to a features-only cache
                LOGGER.warning("%s has no mask logits: adding them; every batch is recomputed (resumable)", self.path)
                reserve_space(self.path, self.mask_bytes() + SPACE_MARGIN[1])
                self._create_masks()
            self._file.flush()
            return
        feat, other = self.bytes_per_image()
        reserve_space(self.path, int((feat + other) * len(self.image_ids) * SPACE_MARGIN[0]) + self.mask_bytes()
                      + SPACE_MARGIN[1])
        try:
            self._file = h5py.File(self.path, "w")
            self._create(compression)
            self._file.attrs.update({
                "fingerprint": json.dumps(fingerprint.as_dict()),
                "teacher_config": json.dumps(dict(teacher_config), default=str),
                "feature_specs": _specs_json(self.specs),
                "input_size": self.input_size,
                "dataset": dataset,
                "split": split,
                "batch_size": int(batch_size),
                "storage": self.storage,
                "with_flip": self.with_flip,
                "format_version": FORMAT_VERSIONS[self.storage],
                "vfmkd_version": vfmkd.__version__,
                "teacher": teacher,
                "data_root": data_root or "",
                **(extra_attrs or {}),
            })
            codec.add_stats_datasets(self._file, self.specs, len(self.image_ids))
            if self.masks is not None:
                self._create_masks()
            self._file.flush()
        except BaseException as exc:  # a half-created file is ours (we hold the lock): remove it
            if getattr(self, "_file", None) is not None and self._file.id.valid:
                self._file.close()
            self.path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise CacheWriteError(exc.errno, f"cannot create the cache {self.path} ({exc}); check free space and "
                                      f"permissions there, or write to another --output") from exc
            raise

    def _create(self, compression: Optional[str]) -> None:
        f, n = self._file, len(self.image_ids)
        f.create_dataset("image_ids", data=np.array(self.image_ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("orig_hw", data=np.zeros((n, 2), np.int32))
        f.create_dataset("done", data=np.zeros(n, bool))
        for flipped in (False, True) if self.with_flip else (False,):
            group_name, affine, valid = _FLIP[flipped]
            f.create_dataset(affine, data=np.zeros((n, 4), np.float32))
            f.create_dataset(valid, data=np.zeros((n, 2), np.float32))
            group = f.create_group(group_name)
            for s in self.specs:
                side = self.input_size // s.stride
                alloc_dataset(group, s.name, (n, s.channels, side, side), codec.VALUE_DTYPE[self.storage],
                              (1, s.channels, side, side), compression)
                if self.storage == "int8":
                    for key, shape in codec.scale_shapes(s.channels, side, side).items():
                        alloc_dataset(group, s.name + codec.SCALES[key], (n, *shape), codec.SCALE_DTYPE, (1, *shape),
                                      compression)

    def mask_bytes(self) -> int:
        """Bytes of the mask datasets of this plan (0 without masks)."""
        if self.masks is None:
            return 0
        n = len(self.image_ids)
        return int(self.masks.offsets[-1]) * codec.mask_bytes(self.storage, self.mask_side, self.with_flip) + 9 * n + 8

    def _create_masks(self) -> None:
        """The mask datasets of :attr:`masks` (feature_cache module docstring), preallocated; offsets,
        label_index and cls written now, ``masks_done`` all False."""
        assert self.masks is not None
        f, plan, side = self._file, self.masks, self.mask_side
        offsets = plan.offsets
        m = int(offsets[-1])
        g = f.require_group(MASK_GROUPS[False])
        g.create_dataset("offsets", data=offsets)
        g.create_dataset("label_index",
                         data=np.concatenate([np.arange(len(c)) for c in plan.cls] + [np.zeros(0)]).astype(np.int64))
        g.create_dataset("cls",
                         data=np.concatenate([np.asarray(c, np.int64) for c in plan.cls] + [np.zeros(0, np.int64)]))
        for flipped in (False, True) if self.with_flip else (False,):
            grp = f.require_group(MASK_GROUPS[flipped])
            alloc_dataset(grp, "logits", (m, side, side), codec.VALUE_DTYPE[self.storage])
            if self.storage == "int8":
                alloc_dataset(grp, "scale", (m,), codec.SCALE_DTYPE)
            alloc_dataset(grp, "boxes", (m, 4), np.float32)
        f.create_dataset("masks_done", data=np.zeros(len(self.image_ids), bool))
        f.attrs["masks"] = json.dumps(plan.info(side))
        f.attrs["outputs"] = "features,masks"

    def _reopen(self, fingerprint: TeacherFingerprint) -> h5py.File:
        """Open an existing cache for appending, refusing one of another teacher, image list or layout."""
        fix = f"Write to another --output, or delete {self.path} to recompute it."
        try:
            f = h5py.File(self.path, "r+")
        except OSError as exc:  # we hold the lock: no vfmkd writer has it open
            if "lock" in str(exc).lower():
                raise CacheLockedError(f"{self.path} is open in another process ({exc}); wait for it to finish or stop "
                                       f"it, then rerun this command, or write to another --output") from exc
            raise CacheMismatchError(f"cannot open the existing cache {self.path} ({exc}): it is truncated or not an "
                                     f"HDF5 file. {fix}") from exc
        if "fingerprint" not in f.attrs or "image_ids" not in f:
            f.close()
            raise CacheMismatchError(f"{self.path} is an HDF5 file but not a vfmkd feature cache (no fingerprint or "
                                     f"image_ids); it is left untouched. Write to another --output, or move it away.")
        if INDEX_ATTR in f.attrs:
            f.close()
            raise CacheMismatchError(
                f"{self.path} is the index over the shard files a torchrun job wrote next to it, not a file to "
                f"write into: rerun the cache tool on it (with or without torchrun: it resumes the shards and "
                f"re-indexes them; add --join for one self-contained file), or delete it and its "
                f"{self.path.stem}.shard*.h5 to start again.")
        try:
            storage, flip = stored_layout(f.attrs)
            if (storage, flip) != (self.storage, self.with_flip):
                raise CacheMismatchError(
                    f"{self.path} was started with {layout_flags(storage, flip)}, this run has "
                    f"{layout_flags(self.storage, self.with_flip)}. Resume it with the first run's flags, or: {fix}"
                )
            version = attr_value(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSIONS[storage]:
                raise CacheMismatchError(
                    f"{self.path} has cache format {version}, this vfmkd writes {FORMAT_VERSIONS[storage]} for "
                    f"--storage {storage}. {fix}")
            diffs = fingerprint_differences(json.loads(attr_value(f.attrs["fingerprint"])), fingerprint)
            if diffs:
                raise CacheMismatchError(
                    f"{self.path} holds features of another teacher configuration (file != teacher):\n  "
                    + "\n  ".join(diffs) + f"\n{fix}"
                )
            if (
                attr_value(f.attrs["feature_specs"]) != _specs_json(self.specs)
                or attr_value(f.attrs["input_size"]) != self.input_size
            ):
                raise CacheMismatchError(
                    f"{self.path} holds features {attr_value(f.attrs['feature_specs'])} at input_size "
                    f"{attr_value(f.attrs['input_size'])}, this run {_specs_json(self.specs)} at {self.input_size} "
                    f"(keep --features as in the first run). {fix}"
                )
            if "masks" in f.attrs:
                info = json.loads(attr_value(f.attrs["masks"]))
                if self.masks is None:
                    raise CacheMismatchError(
                        f"{self.path} was started with --outputs features,masks, this run has --outputs features. "
                        f"Resume it with --outputs features,masks, or: {fix}")
                if (
                    info.get("labels_sha256") != self.masks.labels_sha256
                    or info.get("prompt_source") != self.masks.prompt_source
                ):
                    raise CacheMismatchError(
                        f"{self.path} holds mask logits prompted with other labels: the label files changed since it "
                        f"was started ({info.get('prompt_source')} sha256 {info.get('labels_sha256')}, now "
                        f"{self.masks.prompt_source} sha256 {self.masks.labels_sha256}). {fix}")
            cached = list(f["image_ids"].asstr()[:])
            if cached != self.image_ids:
                first = next((i for i, (a, b) in enumerate(zip(cached, self.image_ids)) if a != b),
                             min(len(cached), len(self.image_ids)))
                raise CacheMismatchError(
                    f"{self.path} was started for another image list ({len(cached)} images, this run has "
                    f"{len(self.image_ids)}; they first differ at position {first}). Keep --limit/--data-root as in "
                    f"the first run to resume. {fix}"
                )
        except BaseException:
            f.close()
            raise
        return f

    def missing(self) -> np.ndarray:
        """Indices (into the image list) whose features (or, with masks, mask logits) are not written yet."""
        done = self._file["done"][:]
        if self.masks is not None:
            done &= self._file["masks_done"][:]
        return np.flatnonzero(~done)

    def mask_rows(self, start: int, stop: int) -> Tuple[int, int]:
        """Rows [a, b) of the mask datasets held by images [start, stop)."""
        assert self._offsets is not None, f"{self.path} stores no mask logits"
        return int(self._offsets[start]), int(self._offsets[stop])

    def bytes_per_image(self) -> Tuple[int, int]:
        return bytes_per_image(self.specs, self.input_size, self.storage, self.with_flip)

    def write(self, start: int, features: Mapping[str, torch.Tensor], affine: torch.Tensor, valid_hw: torch.Tensor,
              orig_hw: np.ndarray, flip: Optional[Tuple[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor]] = None,
              masks: Optional[Mapping[bool, Tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        """Store images [start, start + B): features {name: (B, C, h, w)}, affine (B, 4), valid_hw (B, 2),
        orig_hw (B, 2), and (cache with_flip) ``flip`` = (features, affine, valid_hw) of the teacher on the
        mirrored images, the affine already for ORIGINAL pixels (cache_codec.mirror_affine).
        ``masks`` (cache with mask logits): {flipped: (logits (m, S/4, S/4), boxes (m, 4) teacher-pixel
        x1, y1, x2, y2)} per pass, m = the label rows of these images in image order (:meth:`mask_rows`)."""
        if (flip is not None) != self.with_flip:
            raise ValueError(f"{self.path} {'has' if self.with_flip else 'has no'} flip pass: write() needs flip="
                             f"{'(features, affine, valid_hw)' if self.with_flip else 'None'}")
        if (masks is not None) != (self.masks is not None):
            raise ValueError(f"{self.path} {'stores' if self.masks is not None else 'stores no'} mask logits: write() "
                             f"needs masks={'{flipped: (logits, boxes)}' if self.masks is not None else 'None'}")
        if masks is not None and set(masks) != ({False, True} if self.with_flip else {False}):
            raise ValueError(f"write(): mask logits of passes {sorted(masks)}, the cache has "
                             f"{'the plain and the flip pass' if self.with_flip else 'the plain pass only'}")
        try:
            self._write(start, features, affine, valid_hw, orig_hw, flip, masks)
        except OSError as exc:
            raise CacheWriteError(
                exc.errno,
                f"writing images {start}.. to the cache {self.path} failed ({exc}): free "
                f"space there and rerun the same command (it resumes), or write to another --output",
            ) from exc

    def _write(self, start: int, features: Mapping[str, torch.Tensor], affine: torch.Tensor, valid_hw: torch.Tensor,
               orig_hw: np.ndarray, flip: Optional[Tuple[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor]],
               masks: Optional[Mapping[bool, Tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        n = affine.shape[0]
        stop, f = start + n, self._file
        for flipped, (logits, boxes) in (masks or {}).items():
            a, b = self.mask_rows(start, stop)
            side = self.mask_side
            if tuple(logits.shape) != (b - a, side, side) or tuple(boxes.shape) != (b - a, 4):
                raise ValueError(f"mask logits {tuple(logits.shape)} / boxes {tuple(boxes.shape)} of images "
                                 f"{start}..{stop - 1}: the cache expects ({b - a}, {side}, {side}) / ({b - a}, 4) "
                                 "(their label rows)")
            try:
                enc = codec.encode_masks(logits, self.storage)
            except ValueError as exc:
                raise ValueError(
                    f"mask logits{' (flip pass)' if flipped else ''} of images {start}..{stop - 1}: {exc}"
                ) from None
            g = f[MASK_GROUPS[flipped]]
            g["logits"][a:b] = enc["values"]
            if "scale" in enc:
                g["scale"][a:b] = enc["scale"]
            g["boxes"][a:b] = boxes.detach().cpu().float().numpy()
        passes = [(False, features, affine, valid_hw)] + ([(True, *flip)] if flip is not None else [])
        for flipped, feats, aff, valid in passes:
            group, affine_name, valid_name = _FLIP[flipped]
            valid = valid.detach().cpu().float().numpy()
            for s in self.specs:
                ds = f[group][s.name]
                t = feats[s.name]
                if tuple(t.shape) != (n,) + ds.shape[1:]:
                    raise ValueError(f"teacher returned '{s.name}' of shape {tuple(t.shape)}, the cache expects "
                                     f"{(n,) + ds.shape[1:]}")
                try:
                    enc = codec.encode(t, self.storage)
                except ValueError as exc:
                    raise ValueError(f"'{s.name}'{' (flip pass)' if flipped else ''} of images {start}..{stop - 1}: "
                                     f"{exc}") from None
                ds[start:stop] = enc["values"]
                for key, suffix in codec.SCALES.items() if "scale" in enc else ():
                    f[group][s.name + suffix][start:stop] = enc[key]
                if not flipped:  # statistics of exactly what the reader returns
                    rows, cols = codec.valid_cells(valid, s.stride, *ds.shape[2:])
                    decoded = codec.decode(enc["values"], enc.get("scale"), enc.get("channel_scale"))
                    f[f"stats/{s.name}/image_moments"][start:stop] = codec.image_moments(decoded, rows, cols)
            f[affine_name][start:stop] = aff.detach().cpu().float().numpy()
            f[valid_name][start:stop] = valid
        f["orig_hw"][start:stop] = np.asarray(orig_hw, np.int32).reshape(n, 2)
        f.flush()  # data on disk before the batch is marked done
        f["done"][start:stop] = True
        if masks is not None:
            f["masks_done"][start:stop] = True
        f.flush()

    def finalize(self) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
        """Once every image is done, store each feature's per-channel mean and std over the valid cells of
        all images ({name: (mean, std)} float64); None while images are missing. Images without
        per-image moments (files written before statistics existed) get them from the stored features."""
        return codec.store_statistics(self._file, self.specs, self.storage)

    def close(self) -> None:
        try:
            if self._file.id.valid:
                self._file.close()
        finally:
            self._lock.release()

    def __enter__(self) -> FeatureCacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
