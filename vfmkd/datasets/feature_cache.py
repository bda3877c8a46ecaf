"""HDF5 cache of teacher features: one file per teacher and split, ``<output_dir>/<split>.h5``.

Layout (N images, fixed at creation): ``image_ids`` (N,) utf-8; ``orig_hw`` (N, 2) int32;
``affine`` (N, 4) float32; ``valid_hw`` (N, 2) float32; ``done`` (N,) bool;
``features/<name>`` (N, C, h, w) float16 in (1, C, h, w) chunks (one chunk per image). Attributes:
``fingerprint``, ``teacher_config``, ``feature_specs`` (JSON), ``input_size``, ``dataset``,
``split``, ``batch_size``, ``format_version``, ``vfmkd_version``, ``teacher``, ``data_root``, plus
the writer's ``extra_attrs`` (the tool records ``compute``: device and torch threads).

Crash safety: all storage is allocated when the file is created, so a batch write only touches
raw data, never HDF5 metadata. Features are flushed before ``done`` is set and flushed again, so a
SIGKILL loses at most the batch in flight and never leaves a batch marked done with stale data.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import h5py
import numpy as np
import torch

import vfmkd
from vfmkd.core.config import COMPONENT_REF_KEY, TEACHER_USAGE_KEYS, resolve_path
from vfmkd.core.errors import CacheMismatchError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.teachers.base import TeacherFingerprint

FORMAT_VERSION = 1
TOOL = "python tools/prepare_teacher_features.py"
NOT_TEACHER_KWARGS = ("type", COMPONENT_REF_KEY, *TEACHER_USAGE_KEYS)
_INHERITED: List[Any] = []  # handles opened by a parent process: kept alive, never used or closed here


def cache_file(path: str | Path, split: str) -> Path:
    """``path`` itself when it names an .h5 file, else ``path/<split>.h5``."""
    p = Path(path)
    return p if p.suffix in (".h5", ".hdf5") else p / f"{split}.h5"


def dataset_cli_args(root: str | Path) -> tuple[str, Optional[str]]:
    """(--dataset name, --data-root or None when root is the default ``datasets/<name>``)."""
    root = Path(root)
    default = resolve_path(Path("datasets") / root.name)
    return root.name, None if root.resolve() == default.resolve() else str(root)


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, type(None), list, dict)) else str(value)


def rebuild_command(teacher: str, dataset: str, split: str, output: str, data_root: Optional[str] = None,
                    teacher_config: Optional[Mapping[str, Any]] = None, limit: Optional[int] = None) -> str:
    """The exact ``prepare_teacher_features`` command line that fills a cache."""
    args = ["--teacher", teacher, "--dataset", dataset] + (["--data-root", data_root] if data_root else [])
    args += ["--splits", split, "--output", output] + (["--limit", str(limit)] if limit else [])
    args += [f"teacher.{k}={_fmt(v)}" for k, v in (teacher_config or {}).items() if k not in NOT_TEACHER_KWARGS]
    return " ".join([TOOL] + [shlex.quote(a) for a in args])


def fingerprint_differences(cached: Mapping[str, Any], live: TeacherFingerprint, ignore: Sequence[str] = ()) -> List[str]:
    """'field: cached != live' lines (TeacherFingerprint.differences, robust to added fields)."""
    try:
        return live.differences(TeacherFingerprint(**cached), ignore)
    except TypeError:
        mine = live.as_dict()
        keys = sorted(set(cached) | set(mine))
        return [f"{k}: {cached.get(k)!r} != {mine.get(k)!r}" for k in keys if k not in ignore and cached.get(k) != mine.get(k)]


def _specs_json(specs: Sequence[FeatureSpec]) -> str:
    return json.dumps([{"name": s.name, "channels": s.channels, "stride": s.stride} for s in specs])


def _attr(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value.item() if isinstance(value, np.generic) else value


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
        extra_attrs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.path = Path(path)
        self.image_ids = list(image_ids)
        self.specs = tuple(feature_specs)
        self.input_size = int(input_size)
        if self.path.exists():
            self._file = self._reopen(fingerprint)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.path, "w")
            f = self._file
            n = len(self.image_ids)
            f.create_dataset("image_ids", data=np.array(self.image_ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("orig_hw", data=np.zeros((n, 2), np.int32))
            f.create_dataset("affine", data=np.zeros((n, 4), np.float32))
            f.create_dataset("valid_hw", data=np.zeros((n, 2), np.float32))
            f.create_dataset("done", data=np.zeros(n, bool))
            group = f.create_group("features")
            for s in self.specs:
                side = self.input_size // s.stride
                shape = (n, s.channels, side, side)
                if compression is None:  # early allocation: later writes never touch metadata
                    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                    group.create_dataset(s.name, shape, np.float16, chunks=(1,) + shape[1:], dcpl=dcpl, fill_time="never")
                else:  # compressed chunks cannot be preallocated: a kill mid-write may corrupt the file
                    group.create_dataset(s.name, shape, np.float16, chunks=(1,) + shape[1:], compression=compression,
                                         shuffle=True)
            attrs = {
                "fingerprint": json.dumps(fingerprint.as_dict()),
                "teacher_config": json.dumps(dict(teacher_config), default=str),
                "feature_specs": _specs_json(self.specs),
                "input_size": self.input_size,
                "dataset": dataset,
                "split": split,
                "batch_size": int(batch_size),
                "format_version": FORMAT_VERSION,
                "vfmkd_version": vfmkd.__version__,
                "teacher": teacher,
                "data_root": data_root or "",
                **(extra_attrs or {}),
            }
            f.attrs.update(attrs)
            f.flush()
        self.attrs: Dict[str, Any] = {k: _attr(v) for k, v in self._file.attrs.items()}
        self.batch_size = int(self.attrs["batch_size"])

    def _reopen(self, fingerprint: TeacherFingerprint) -> h5py.File:
        """Open an existing cache for appending, refusing one of another teacher or image list."""
        fix = f"Write to another --output, or delete {self.path} to recompute it."
        try:
            f = h5py.File(self.path, "r+")
        except OSError as exc:
            raise CacheMismatchError(f"cannot open the existing cache {self.path} ({exc}). {fix}") from exc
        try:
            version = _attr(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise CacheMismatchError(f"{self.path} has cache format {version}, this vfmkd writes {FORMAT_VERSION}. {fix}")
            diffs = fingerprint_differences(json.loads(_attr(f.attrs["fingerprint"])), fingerprint)
            if diffs:
                raise CacheMismatchError(
                    f"{self.path} holds features of another teacher configuration (file != teacher):\n  "
                    + "\n  ".join(diffs) + f"\n{fix}"
                )
            if _attr(f.attrs["feature_specs"]) != _specs_json(self.specs) or _attr(f.attrs["input_size"]) != self.input_size:
                raise CacheMismatchError(
                    f"{self.path} holds features {_attr(f.attrs['feature_specs'])} at input_size "
                    f"{_attr(f.attrs['input_size'])}, this run {_specs_json(self.specs)} at {self.input_size} "
                    f"(keep --features as in the first run). {fix}"
                )
            cached = list(f["image_ids"].asstr()[:])
            if cached != self.image_ids:
                first = next((i for i, (a, b) in enumerate(zip(cached, self.image_ids)) if a != b), min(len(cached), len(self.image_ids)))
                raise CacheMismatchError(
                    f"{self.path} was started for another image list ({len(cached)} images, this run has "
                    f"{len(self.image_ids)}; they first differ at position {first}). Keep --limit/--data-root as in the "
                    f"first run to resume. {fix}"
                )
        except BaseException:
            f.close()
            raise
        return f

    def missing(self) -> np.ndarray:
        """Indices (into the image list) whose features are not written yet."""
        return np.flatnonzero(~self._file["done"][:])

    def write(self, start: int, features: Mapping[str, torch.Tensor], affine: torch.Tensor, valid_hw: torch.Tensor,
              orig_hw: np.ndarray) -> None:
        """Store images [start, start + B): features (B, C, h, w) as fp16, affine (B, 4), valid_hw (B, 2), orig_hw (B, 2)."""
        n = affine.shape[0]
        stop = start + n
        f = self._file
        for s in self.specs:
            ds = f["features"][s.name]
            arr = features[s.name].detach().to("cpu", torch.float16).numpy()
            if arr.shape != (n,) + ds.shape[1:]:
                raise ValueError(f"teacher returned '{s.name}' of shape {arr.shape}, the cache expects {(n,) + ds.shape[1:]}")
            if not np.isfinite(arr).all():
                raise ValueError(f"'{s.name}' has non-finite values in float16 (overflow above 65504?) for images {start}..{stop - 1}")
            ds[start:stop] = arr
        f["affine"][start:stop] = affine.detach().cpu().float().numpy()
        f["valid_hw"][start:stop] = valid_hw.detach().cpu().float().numpy()
        f["orig_hw"][start:stop] = np.asarray(orig_hw, np.int32).reshape(n, 2)
        f.flush()  # data on disk before the batch is marked done
        f["done"][start:stop] = True
        f.flush()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "FeatureCacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FeatureCacheReader:
    """Read-only access to one cache file; the HDF5 handle is opened lazily in the reading process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._pid: Optional[int] = None
        self._handle: Optional[h5py.File] = None
        try:  # metadata through a short-lived handle: nothing stays open to be inherited by workers
            with h5py.File(self.path, "r") as f:
                self.attrs: Dict[str, Any] = {k: _attr(v) for k, v in f.attrs.items()}
                self.image_ids: List[str] = list(f["image_ids"].asstr()[:])
                self.orig_hw = f["orig_hw"][:]
                self.done = f["done"][:]
        except (OSError, KeyError) as exc:
            raise CacheMismatchError(f"cannot read the feature cache {self.path} ({exc}); delete it and rebuild it") from exc
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(f"{self.path} has cache format {self.attrs.get('format_version')}, expected {FORMAT_VERSION}; rebuild it")
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.fingerprint_dict: Dict[str, Any] = json.loads(self.attrs["fingerprint"])
        self.teacher_config: Dict[str, Any] = json.loads(self.attrs["teacher_config"])
        self.feature_specs = tuple(FeatureSpec(**d) for d in json.loads(self.attrs["feature_specs"]))
        self.input_size = int(self.attrs["input_size"])

    @property
    def fingerprint(self) -> TeacherFingerprint:
        return TeacherFingerprint(**self.fingerprint_dict)

    def _h5(self) -> h5py.File:
        pid = os.getpid()
        if self._pid != pid:  # first use in this process (e.g. a forked DataLoader worker)
            if self._handle is not None:
                _INHERITED.append(self._handle)  # the parent's: closing it here could unlock the parent's file
            self._handle, self._pid = h5py.File(self.path, "r"), pid
        return self._handle

    def __getstate__(self) -> Dict[str, Any]:  # spawn workers / pickling: never ship a handle
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, None
        return state

    def index_of(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise CacheMismatchError(f"image {image_id!r} is not in {self.path}; fill it with:\n  {self.rebuild_command()}") from None

    def missing_ids(self, ids: Sequence[str]) -> List[str]:
        """The ids that are not in the cache or not written yet (done=False)."""
        return [i for i in ids if i not in self._index or not self.done[self._index[i]]]

    def read(self, image_id: str) -> Dict[str, Any]:
        """{features: {name: (C, h, w) fp16}, affine: (4,), valid_hw: (2,), input_size: int} of one image."""
        i = self.index_of(image_id)
        if not self.done[i]:
            raise CacheMismatchError(f"image {image_id!r} is not written yet in {self.path}; finish it with:\n  {self.rebuild_command()}")
        f = self._h5()
        return {
            "features": {s.name: torch.from_numpy(f["features"][s.name][i]) for s in self.feature_specs},
            "affine": torch.from_numpy(f["affine"][i]),
            "valid_hw": torch.from_numpy(f["valid_hw"][i]),
            "input_size": self.input_size,
        }

    def rebuild_command(self, data_root: Optional[str] = None, teacher_config: Optional[Mapping[str, Any]] = None,
                        limit: Optional[int] = None) -> str:
        """The tool command for this file; teacher overrides from ``teacher_config`` (default: the cached one)."""
        cfg = self.teacher_config if teacher_config is None else teacher_config
        teacher = self.attrs.get("teacher") or cfg.get("type") or self.teacher_config.get("type", "?")
        return rebuild_command(teacher, self.attrs.get("dataset", "?"), self.attrs.get("split", "?"), str(self.path.parent),
                               data_root or self.attrs.get("data_root") or None, cfg, limit)

    def check_matches(self, fingerprint: TeacherFingerprint, ignore: Sequence[str] = (),
                      teacher_config: Optional[Mapping[str, Any]] = None) -> None:
        """Raise CacheMismatchError naming every differing fingerprint field and the rebuild command
        (``teacher_config``: the live teacher's resolved entry, for the command's overrides)."""
        diffs = fingerprint_differences(self.fingerprint_dict, fingerprint, ignore)
        if diffs:
            raise CacheMismatchError(
                f"{self.path} holds features of another teacher configuration (cache != teacher):\n  " + "\n  ".join(diffs)
                + f"\nRebuild it for this teacher (delete {self.path} first, or write to another --output):\n  "
                + self.rebuild_command(teacher_config=teacher_config or {})
                + ("" if teacher_config else "  (+ the teacher.key=value settings of your experiment)")
            )

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle, self._pid = None, None
