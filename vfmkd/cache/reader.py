"""Reads the HDF5 teacher-feature cache (layout: the feature_cache module docstring): one file's
features, geometry, mask logits and statistics, with its HDF5 handle opened lazily per process. A
split's file may be the index over the shards a torchrun job wrote (vfmkd/cache/shards.py): the
features are then read straight from the shard files, the rest from the index."""
from __future__ import annotations

import json
import os
import shlex
from bisect import bisect_right
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

from vfmkd.cache import codec
from vfmkd.cache.codec import FLIP_GROUPS as _FLIP
from vfmkd.cache.codec import FORMAT_VERSIONS, MASK_GROUPS, bytes_per_image, stored_layout
from vfmkd.cache.format import (
    TOOL,
    CorruptCacheError,
    attr_value,
    fingerprint_differences,
    finite_values,
    label_files_sha256,
    rebuild_command,
)
from vfmkd.cache.phi_s import PhiS, read_phi_s
from vfmkd.cache.shards import shards_of
from vfmkd.core.errors import CacheMismatchError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.fingerprint import TeacherFingerprint

_INHERITED: List[Any] = []  # handles opened by a parent process: kept alive, never used or closed here


class FeatureCacheReader:
    """Read-only access to one cache file; the HDF5 handle is opened lazily in the reading process.
    ``read`` returns float16 features whatever the storage (int8 is dequantised)."""

    def __init__(self, path: str | Path, rebuild: Optional[str] = None, check_finite: bool = True) -> None:
        """``rebuild``: the command that rewrites this file (named when it cannot be read; default: the
        tool's command for its split and folder). ``check_finite``: every read checks the values are
        finite (one pass over the chunk just read) and raises :class:`CorruptCacheError` otherwise."""
        self.path = Path(path)
        self.check_finite = bool(check_finite)
        self._pid: Optional[int] = None
        self._handle: Optional[h5py.File] = None
        self._ds: Dict[Tuple[int, str], Tuple[Any, ...]] = {}  # per process: dataset, direct?, shape, dtype, zeros
        self._shard_handles: Dict[int, h5py.File] = {}  # per process, shard k of an index file
        self._stats: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self._phi_s: Dict[str, PhiS] = {}  # feature -> its PHI-S transform (caches finished with one)
        try:  # metadata through a short-lived handle: nothing stays open to be inherited by workers
            with h5py.File(self.path, "r") as f:
                self.attrs: Dict[str, Any] = {k: attr_value(v) for k, v in f.attrs.items()}
                self.image_ids: List[str] = list(f["image_ids"].asstr()[:])
                self.orig_hw = f["orig_hw"][:]
                self.done = f["done"][:]
                self.storage, self.has_flip = stored_layout(self.attrs)
                self.mask_info: Optional[Dict[str,
                                              Any]] = json.loads(self.attrs["masks"]) if "masks" in self.attrs else None
                if self.mask_info is not None:
                    self.mask_offsets = f["masks/offsets"][:]
                    self.masks_done = f["masks_done"][:]
                self.shards = shards_of(f.attrs, self.path)  # [] unless the file is a shard index
                self._geometry = {flipped: (f[a][:], f[v][:]) for flipped, (_, a, v) in _FLIP.items() if a in f}
                for name, g in f.get("stats", {}).items():
                    mean, std = g["mean"][:], g["std"][:]
                    if np.isfinite(mean).all() and np.isfinite(std).all():  # NaN: the cache is not finished
                        self._stats[name] = (mean, std)
                    phi = read_phi_s(g)
                    if phi is not None:
                        self._phi_s[name] = phi
        except (OSError, KeyError) as exc:
            cmd = rebuild or (f"{TOOL} --splits {shlex.quote(self.path.stem)} --output "
                              f"{shlex.quote(str(self.path.parent))} --teacher <teacher> (+ the --dataset, --features, "
                              "--storage and teacher.key=value settings it was built with)")
            what = ("is not a vfmkd feature cache (no fingerprint/image_ids)" if isinstance(exc, KeyError)
                    else "is truncated or not an HDF5 file")
            raise CacheMismatchError(f"cannot read the feature cache {self.path}: it {what} ({exc}). Rebuild it "
                                     f"(delete {self.path} first, or write to another --output):\n  {cmd}") from exc
        version = self.attrs.get("format_version")
        if self.storage not in FORMAT_VERSIONS or version != FORMAT_VERSIONS[self.storage]:
            raise CacheMismatchError(f"{self.path} has cache format {version} (storage {self.storage}), this vfmkd "
                                     f"reads {', '.join(f'{v} ({k})' for k, v in FORMAT_VERSIONS.items())}; rebuild it")
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.fingerprint_dict: Dict[str, Any] = json.loads(self.attrs["fingerprint"])
        self.teacher_config: Dict[str, Any] = json.loads(self.attrs["teacher_config"])
        self.feature_specs = tuple(FeatureSpec(**d) for d in json.loads(self.attrs["feature_specs"]))
        self.input_size = int(self.attrs["input_size"])
        self._check_shards(rebuild)

    def _check_shards(self, rebuild: Optional[str]) -> None:
        """An index file: every shard it maps must be there (HDF5 would read a missing one as fill values)."""
        self._shard_starts = [start for _, start, _ in self.shards]
        missing = [str(p) for p, _, _ in self.shards if not p.is_file()]
        if missing:
            raise CacheMismatchError(
                f"{self.path} is the index over {len(self.shards)} shard files written by torchrun, and "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing (a shard index is read "
                f"together with its shards: move or copy the folder whole). Rerun the torchrun command that wrote "
                f"it (it recomputes the missing shards), or rebuild:\n  {rebuild or self.rebuild_command()}")

    @property
    def fingerprint(self) -> TeacherFingerprint:
        return TeacherFingerprint(**self.fingerprint_dict)

    @property
    def has_masks(self) -> bool:
        """The file stores box-prompted mask logits for every image whose features are written."""
        return self.mask_info is not None and bool(self.masks_done[self.done].all())

    def check_labels(self, label_dir: str | Path) -> None:
        """Raise CacheMismatchError (naming the rebuild command) when the label files the mask logits were
        prompted with changed since: their sha256 over this cache's images differs from the stored one."""
        if self.mask_info is None:
            return
        now = label_files_sha256(label_dir, self.image_ids)
        if now != self.mask_info.get("labels_sha256"):
            raise CacheMismatchError(
                f"{self.path}: the cached mask logits are stale: the detection label files in {label_dir} changed "
                f"since they were prompted with them (labels sha256 {self.mask_info.get('labels_sha256')}, now {now}). "
                f"Rebuild the cache (delete {self.path} first, or write to another --output):\n  "
                f"{self.rebuild_command()}")

    def bytes_per_image(self) -> Tuple[int, int]:
        return bytes_per_image(self.feature_specs, self.input_size, self.storage, self.has_flip)

    def _h5(self) -> h5py.File:
        pid = os.getpid()
        if self._pid != pid:  # first use in this process (e.g. a forked DataLoader worker)
            # the parent's handles: closing them here could unlock the parent's files
            _INHERITED.extend([self._handle] if self._handle is not None else [])
            _INHERITED.extend(self._shard_handles.values())
            self._handle, self._pid, self._ds, self._shard_handles = h5py.File(self.path, "r"), pid, {}, {}
        return self._handle

    def __getstate__(self) -> Dict[str, Any]:  # spawn workers / pickling: never ship a handle
        state = dict(self.__dict__)
        state["_handle"], state["_pid"], state["_ds"], state["_shard_handles"] = None, None, {}, {}
        return state

    def _locate(self, i: int) -> Tuple[int, h5py.File, int]:
        """(shard k or -1, the file holding image ``i``'s features, its row there)."""
        f = self._h5()
        if not self.shards:
            return -1, f, i
        k = bisect_right(self._shard_starts, i) - 1
        if k not in self._shard_handles:
            self._shard_handles[k] = h5py.File(self.shards[k][0], "r")
        return k, self._shard_handles[k], i - self._shard_starts[k]

    def _dataset(self, key: str, i: int) -> Tuple[Tuple[Any, ...], int]:
        """((dataset, one raw chunk per image?, per-image shape, dtype, zero coordinates, OS file descriptor of its
        file), row of image ``i`` there)."""
        k, f, i = self._locate(i)
        if (k, key) not in self._ds:
            ds = f[key]
            direct = ds.chunks == (1,) + ds.shape[1:] and ds.id.get_create_plist().get_nfilters() == 0
            self._ds[k, key] = (ds, direct, ds.shape[1:], ds.dtype, (0,) * (ds.ndim - 1), f.id.get_vfd_handle())
        return self._ds[k, key], i

    def _array(self, key: str, i: int) -> np.ndarray:
        """Image ``i`` of dataset ``key``; one-chunk-per-image unfiltered data is read as a raw chunk
        (skips HDF5's selection machinery: ~3x faster on a warm page cache)."""
        (ds, direct, shape, dtype, zeros, _), i = self._dataset(key, i)
        if not direct:
            return ds[i]
        out = np.empty(shape, dtype)
        ds.id.read_direct_chunk((i, *zeros), out=out.reshape(-1).view(np.uint8))
        return out

    def index_of(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise CacheMismatchError(f"image {image_id!r} is not in {self.path}; fill it with:\n  "
                                     f"{self.rebuild_command()}") from None

    def missing_ids(self, ids: Sequence[str]) -> List[str]:
        """The ids that are not in the cache or not written yet (done=False)."""
        return [i for i in ids if i not in self._index or not self.done[self._index[i]]]

    def will_need(self, image_id: str, flipped: bool = False) -> None:
        """Ask the OS to start reading image ``image_id``'s feature chunks now (``posix_fadvise(WILLNEED)``), so
        the reads of a batch reach the disk together instead of one after another (cold page cache); the
        later :meth:`read` finds them in memory. A hint only: unknown or unwritten images, chunk layouts
        other than one raw chunk per image and systems without ``posix_fadvise`` are skipped."""
        i = self._index.get(image_id)
        if i is None or not self.done[i] or (flipped and not self.has_flip) or not hasattr(os, "posix_fadvise"):
            return
        group = _FLIP[bool(flipped)][0]
        suffixes = ("", *codec.SCALES.values()) if self.storage == "int8" else ("",)
        for s in self.feature_specs:
            for suffix in suffixes:
                (ds, direct, _, _, zeros, fd), row = self._dataset(f"{group}/{s.name}{suffix}", i)
                if direct:
                    chunk = ds.id.get_chunk_info_by_coord((row, *zeros))
                    os.posix_fadvise(fd, chunk.byte_offset, chunk.size, os.POSIX_FADV_WILLNEED)

    def read(self, image_id: str, flipped: bool = False, dequantize: bool = True) -> Dict[str, Any]:
        """{features: {name: (C, h, w) float16}, affine: (4,), valid_hw: (2,), input_size: int} of one image.
        ``flipped``: the teacher's pass on the horizontally mirrored image (a cache built with
        --with-flip); its affine maps ORIGINAL pixels to the teacher canvas (sx < 0).
        ``dequantize=False`` (int8 caches): features[name] = {"values": int8 (C, h, w), "scale": (h, w),
        "channel_scale": (C,)} for :func:`cache_codec.dequantize` after collation, e.g. on the GPU."""
        if flipped and not self.has_flip:
            raise CacheMismatchError(
                f"{self.path} has no flipped teacher pass (it was built without --with-flip). Delete it (or pick "
                f"another --output) and rebuild it with the flip pass:\n  {self.rebuild_command(with_flip=True)}")
        i = self.index_of(image_id)
        if not self.done[i]:
            raise CacheMismatchError(f"image {image_id!r} is not written yet in {self.path}; finish it with:\n  "
                                     f"{self.rebuild_command()}")
        group = _FLIP[bool(flipped)][0]
        feats: Dict[str, Any] = {}
        for s in self.feature_specs:
            values = self._array(f"{group}/{s.name}", i)
            if values.dtype != np.int8:
                if self.check_finite:
                    self.check_values(values, f"{group}/{s.name}", image_id)
                feats[s.name] = torch.from_numpy(values)
                continue
            scales = {k: self._array(f"{group}/{s.name}{x}", i) for k, x in codec.SCALES.items()}
            if self.check_finite:
                for k, x in codec.SCALES.items():
                    self.check_values(scales[k], f"{group}/{s.name}{x}", image_id)
            feats[s.name] = codec.decode_int8(values, **scales) if dequantize else \
                {"values": torch.from_numpy(values), **{k: torch.from_numpy(v) for k, v in scales.items()}}
        affine, valid = self._geometry[bool(flipped)]
        out = {"features": feats, "affine": torch.from_numpy(affine[i].copy()),
               "valid_hw": torch.from_numpy(valid[i].copy()), "input_size": self.input_size}
        if self.mask_info is not None and self.masks_done[i]:
            out["masks"] = self.read_masks(i, image_id, flipped, dequantize)
        return out

    def read_masks(self, i: int, image_id: str, flipped: bool, dequantize: bool) -> Dict[str, torch.Tensor]:
        """{logits (K, S/4, S/4) float16 (int8 with ``dequantize=False``, plus ``scale`` (K,) float32),
        label_index (K,) int64, cls (K,) int64, boxes (K, 4) float32 teacher pixels} of image ``i``."""
        f, a, b = self._h5(), int(self.mask_offsets[i]), int(self.mask_offsets[i + 1])
        g = f[MASK_GROUPS[bool(flipped)]]
        values = g["logits"][a:b]
        scale = g["scale"][a:b] if "scale" in g else None
        if self.check_finite:
            self.check_values(values, f"{g.name}/logits", image_id)
            if scale is not None:
                self.check_values(scale, f"{g.name}/scale", image_id)
        out = {"label_index": torch.from_numpy(f["masks/label_index"][a:b]),
               "cls": torch.from_numpy(f["masks/cls"][a:b]),
               "boxes": torch.from_numpy(g["boxes"][a:b])}
        if scale is None or dequantize:
            out["logits"] = codec.decode_masks(values, scale)
        else:
            out["logits"], out["scale"] = torch.from_numpy(values), torch.from_numpy(scale)
        return out

    def check_values(self, values: np.ndarray, key: str, image_id: str) -> None:
        """Raise :class:`CorruptCacheError` naming the file, dataset, image and the rebuild command when
        ``values`` (one image's chunk as read) hold NaN/inf. The writer refuses non-finite features, so
        such values mean the file was damaged after it was written. Cost: one integer pass over the chunk
        (~0.1 ms for SAM's 256x64x64; numpy's float16 isfinite would take ~3 ms)."""
        if finite_values(values):
            return
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise CorruptCacheError(
            f"{self.path}: the cached '{key}' of image {image_id!r} holds {bad} non-finite value(s) (NaN/inf): the "
            "file is damaged (disk or copy error; vfmkd never writes them). This is not a learning-rate problem. "
            f"Rebuild the cache (delete {self.path} first, or write to another --output):\n  {self.rebuild_command()}")

    def stats(self, name: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Per-channel (mean, std) float32 (C,) of feature ``name`` over the valid cells of every image
        (plain pass, values as read); None for files without statistics or not finished yet."""
        if name not in {s.name for s in self.feature_specs}:
            raise KeyError(f"{self.path} caches {', '.join(s.name for s in self.feature_specs)}, not {name!r}")
        got = self._stats.get(name)
        return None if got is None else (torch.from_numpy(got[0].copy()), torch.from_numpy(got[1].copy()))

    def phi_s(self, name: str) -> Optional[PhiS]:
        """Feature ``name``'s PHI-S transform stored at cache time (:mod:`vfmkd.cache.phi_s`); None for files
        written before it existed or not finished yet."""
        return self._phi_s.get(name)

    def rebuild_command(self, data_root: Optional[str] = None, teacher_config: Optional[Mapping[str, Any]] = None,
                        limit: Optional[int] = None, with_flip: Optional[bool] = None,
                        masks: Optional[bool] = None) -> str:
        """The tool command for this file (its storage, flip pass, features and outputs); teacher overrides
        from ``teacher_config`` (default: the cached one). ``masks=True``: the command that adds mask
        logits (``--outputs features,masks``; it reopens this file and fills them, resumably)."""
        cfg = self.teacher_config if teacher_config is None else teacher_config
        teacher = self.attrs.get("teacher") or cfg.get("type") or self.teacher_config.get("type", "?")
        return rebuild_command(teacher, self.attrs.get("dataset", "?"), self.attrs.get("split", "?"),
                               str(self.path.parent),
                               data_root or self.attrs.get("data_root") or None, cfg, limit, self.storage,
                               self.has_flip if with_flip is None else with_flip, [s.name for s in self.feature_specs],
                               ("features",
                                "masks") if (self.mask_info is not None if masks is None else masks) else ("features",),
                               int((self.mask_info or {}).get("num_classes", 80)))

    def check_matches(self, fingerprint: TeacherFingerprint, ignore: Sequence[str] = (),
                      teacher_config: Optional[Mapping[str, Any]] = None) -> None:
        """Raise CacheMismatchError naming every differing fingerprint field and the rebuild command
        (``teacher_config``: the live teacher's resolved entry, for the command's overrides)."""
        diffs = fingerprint_differences(self.fingerprint_dict, fingerprint, ignore)
        if diffs:
            raise CacheMismatchError(
                f"{self.path} holds features of another teacher configuration (cache != teacher):\n  "
                + "\n  ".join(diffs)
                + f"\nRebuild it for this teacher (delete {self.path} first, or write to another --output):\n  "
                + self.rebuild_command(teacher_config=teacher_config or {})
                + ("" if teacher_config else "  (+ the teacher.key=value settings of your experiment)")
            )

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in [self._handle, *self._shard_handles.values()]:
                if handle is not None:
                    handle.close()
        self._handle, self._pid, self._ds, self._shard_handles = None, None, {}, {}
