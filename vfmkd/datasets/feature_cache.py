"""HDF5 cache of teacher features: one file per teacher and split, ``<output_dir>/<split>.h5``.

Layout (N images, fixed at creation): ``image_ids`` (N,) utf-8; ``orig_hw`` (N, 2) int32;
``affine`` (N, 4) float32; ``valid_hw`` (N, 2) float32; ``done`` (N,) bool; ``features/<name>``
(N, C, h, w) in (1, C, h, w) chunks (one chunk per image): float16, or with ``storage=int8`` int8
plus float32 ``features/<name>_scale`` (N, h, w) per-cell and ``features/<name>_channel_scale`` (N, C)
per-channel scales (see cache_codec.py).
With a flip pass (``with_flip``): ``features_flip/<name>`` (same layout), ``affine_flip`` (N, 4) and
``valid_hw_flip`` (N, 2): the teacher on the horizontally mirrored image, its affine re-expressed for
ORIGINAL pixels (sx < 0). Statistics of the plain pass: ``stats/<name>/image_moments`` (N, 2, C)
float64 per-image [mean, sum of squared deviations] over valid cells, and, once every image is done,
``stats/<name>/mean`` and ``stats/<name>/std`` (C,) float32 (NaN until then).
Mask logits (``--outputs features,masks``; M = total prompt boxes of the N images, fixed at creation
from the label files): ``masks/offsets`` (N + 1,) int64 (image i owns rows offsets[i]:offsets[i+1],
K_i = its label rows, possibly 0), ``masks/label_index`` (M,) int64 (row of the prompt box in the
image's detection label file, as ``parse_labels`` returns them) and ``masks/cls`` (M,) int64, written
at creation; per pass (``masks`` and, with the flip pass, ``masks_flip``) ``logits`` (M, S/4, S/4)
float16 or int8 (+ ``scale`` (M,) float32 per mask), ``boxes`` (M, 4) float32 x1, y1, x2, y2 prompt
boxes in teacher pixels of that pass; ``masks_done`` (N,) bool. All contiguous and preallocated. The
``masks`` attribute (JSON) records ``prompt_source``, ``labels_sha256`` (:func:`label_files_sha256`),
``side`` and ``count``; ``outputs`` is ``features`` or ``features,masks``. A features-only cache
reopened with masks gets the mask datasets added and every batch recomputed (resumably).
Attributes: ``fingerprint``, ``teacher_config``, ``feature_specs`` (JSON), ``input_size``, ``dataset``,
``split``, ``batch_size``, ``storage``, ``with_flip``, ``format_version`` (1 for float16, 2 for
int8, which older readers must refuse), ``vfmkd_version``, ``teacher``, ``data_root``, plus the
writer's ``extra_attrs`` (the tool records ``compute``: device and torch threads).

Crash safety: all storage is allocated when the file is created, so a batch write only touches
raw data, never HDF5 metadata. Features are flushed before ``done`` is set and flushed again, so a
SIGKILL loses at most the batch in flight and never leaves a batch marked done with stale data.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path
import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

import vfmkd
from vfmkd.core.config import COMPONENT_REF_KEY, TEACHER_USAGE_KEYS, resolve_path
from vfmkd.core.errors import CacheMismatchError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.datasets import cache_codec as codec
from vfmkd.datasets.cache_codec import FLIP_GROUPS as _FLIP
from vfmkd.datasets.cache_codec import MASK_GROUPS
from vfmkd.datasets.cache_codec import FORMAT_VERSIONS, alloc_dataset, bytes_per_image, layout_flags, stored_layout
from vfmkd.core.fingerprint import TeacherFingerprint

FORMAT_VERSION = 1  # float16 files (readable by every vfmkd reader); int8 files: codec.FORMAT_VERSIONS
TOOL = "python tools/prepare_teacher_features.py"
NOT_TEACHER_KWARGS = ("type", COMPONENT_REF_KEY, *TEACHER_USAGE_KEYS)
_INHERITED: List[Any] = []  # handles opened by a parent process: kept alive, never used or closed here
LOGGER = logging.getLogger("vfmkd")
SPACE_MARGIN = 1.1, 1 << 20  # reserve bytes_per_image * N * 1.1 + 1 MiB before creating a cache


class CacheLockedError(CacheMismatchError):
    """Another live process is writing this cache (its lock file names the process)."""


class CacheWriteError(OSError):
    """The cache cannot be written (no space, unwritable or invalid output path); errno is kept."""

    user_error = True  # vfmkd.utils.cli: one message, exit 2


class CorruptCacheError(CacheMismatchError):
    """Cached values are not finite (NaN/inf): the file is damaged."""


def finite_values(values: np.ndarray) -> bool:
    """True when ``values`` hold no NaN/inf. float16: the exponent bits (all ones = NaN/inf), an integer
    pass ~30x faster than numpy's float16 ``isfinite``; other dtypes: ``isfinite``."""
    if values.dtype == np.float16:
        return values.size == 0 or int(np.max(values.reshape(-1).view(np.uint16) & 0x7C00)) != 0x7C00
    if values.dtype.kind != "f":
        return True
    return bool(np.isfinite(values).all())


def _proc_start(pid: int) -> str:
    """The process's start time (Linux /proc), to tell a live writer from a reused PID; '' elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _proc_start(pid)
    return not (start and now and now != start)  # another process under the same PID: the writer is gone


class CacheLock:
    """``<cache>.lock`` next to the .h5, created atomically (O_CREAT | O_EXCL) and removed on release.
    Holds JSON {pid, host, start, argv}. A lock whose process is gone (same host) is taken over
    with a warning; a live one (or one from another host) is refused, never "delete the file"."""

    def __init__(self, path: str | Path) -> None:
        self.cache = Path(path)
        self.path = self.cache.with_name(self.cache.name + ".lock")
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()), "argv": sys.argv}
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        self.held = True
        return True

    def _owner(self) -> Dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "CacheLock":
        for _ in range(3):  # a lock released or taken over between our attempts: try again
            if self._create():
                return self
            owner = self._owner()
            pid, host = owner.get("pid"), owner.get("host")
            if not isinstance(pid, int) or host != socket.gethostname() or _alive(pid, owner.get("start", "")):
                if not owner and not self.path.exists():
                    continue
                known = isinstance(pid, int) and host == socket.gethostname()
                who = f"process {pid} on {host}" if isinstance(pid, int) else "another process (its lock names no process yet)"
                cmd = " ".join(owner.get("argv") or [])
                raise CacheLockedError(
                    f"{self.cache} is being written by {who}{f' ({cmd})' if cmd else ''}; lock {self.path}. "
                    f"Wait for it to finish, or stop it{f' (kill {pid})' if known else ''} and rerun this "
                    f"command: it resumes the cache. To cache in parallel, write to another --output."
                    + ("" if known else f" Only if no process is writing it any more, remove the lock file {self.path} "
                       f"(the .lock, never the cache).")
                )
            LOGGER.warning("%s: taking over the lock of process %s, which is no longer running (it was killed "
                           "mid-write; the cache resumes from its last finished batch)", self.cache, pid)
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise CacheLockedError(f"{self.cache}: its lock {self.path} keeps changing hands; is another writer running?")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if self._owner().get("pid") == os.getpid():
                    self.path.unlink()
            except FileNotFoundError:
                pass


def reserve_space(path: Path, nbytes: int) -> None:
    """Raise CacheWriteError unless ``nbytes`` can be allocated next to ``path`` (posix_fallocate of a
    scratch file: counts free space, quotas and file-size limits; HDF5 itself may crash on a full disk)."""
    scratch = path.with_name(path.name + ".space-check")
    try:
        fd = os.open(scratch, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, max(1, nbytes))
        finally:
            os.close(fd)
            os.unlink(scratch)
    except OSError as exc:
        raise CacheWriteError(exc.errno, f"cannot allocate the {nbytes / 2**20:.1f} MiB cache {path} "
                              f"({os.strerror(exc.errno) if exc.errno else exc}): free space on that disk, or write to "
                              f"another --output") from exc


def _make_dir(folder: Path) -> None:
    """mkdir -p ``folder``, or a CacheWriteError saying why not (a file in the way, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise CacheWriteError(exc.errno, f"cannot create the cache folder {folder}: {exc.filename or folder} is a file, "
                              f"not a folder; give --output a folder (or a .h5 path)") from exc
    except NotADirectoryError as exc:
        raise CacheWriteError(exc.errno, f"cannot create the cache folder {folder}: part of that path is a file "
                              f"({exc}); give --output a folder") from exc
    except OSError as exc:
        raise CacheWriteError(exc.errno, f"cannot create the cache folder {folder} ({exc.strerror or exc}); "
                              f"choose another --output") from exc


OUTPUTS = ("features", "masks")


@dataclass(frozen=True)
class MaskPlan:
    """What the mask logits of a cache are prompted with, known before any teacher pass:
    ``cls`` per image (K_i,) int64 class ids of its label rows (row j = label_index j),
    ``prompt_source`` (e.g. ``detection-labels:object_detection/labels/train2017``) and
    ``labels_sha256`` (:func:`label_files_sha256` of those label files)."""

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


def label_files_sha256(label_dir: str | Path, image_ids: Sequence[str]) -> str:
    """sha256 over ``<id>\0<bytes of label_dir/<id>.txt>\0`` of every image in order (a missing file
    hashes as ``<missing>``): any edit, addition or removal of a label file changes it."""
    h, folder = hashlib.sha256(), Path(label_dir)
    for image_id in image_ids:
        path = folder / f"{image_id}.txt"
        h.update(image_id.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


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
                    teacher_config: Optional[Mapping[str, Any]] = None, limit: Optional[int] = None,
                    storage: str = "float16", with_flip: bool = False, features: Optional[Sequence[str]] = None,
                    outputs: Sequence[str] = ("features",), num_classes: int = 80) -> str:
    """The exact ``prepare_teacher_features`` command line that fills (or resumes) a cache;
    ``outputs`` ``("features", "masks")`` adds ``--outputs features,masks`` (mask logits prompted with
    the detection labels; ``num_classes`` for parsing them, named when not 80)."""
    args = ["--teacher", teacher, "--dataset", dataset] + (["--data-root", data_root] if data_root else [])
    args += ["--splits", split, "--output", output] + (["--limit", str(limit)] if limit else [])
    if "masks" in outputs:
        args += ["--outputs", ",".join(o for o in OUTPUTS if o in outputs)]
        args += ["--num-classes", str(num_classes)] if num_classes != 80 else []
    args += (["--features", ",".join(features)] if features else []) + (["--storage", storage] if storage != "float16" else [])
    args += ["--with-flip"] if with_flip else []
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
        storage: str = "float16",
        with_flip: bool = False,
        extra_attrs: Optional[Mapping[str, Any]] = None,
        masks: Optional[MaskPlan] = None,
    ) -> None:
        """``masks``: also store box-prompted mask logits (see the module docstring) for this plan."""
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
        _make_dir(self.path.parent)
        self._lock = CacheLock(self.path)
        try:
            self._lock.acquire()
        except PermissionError as exc:
            raise CacheWriteError(exc.errno, f"cannot write the cache {self.path}: the folder {self.path.parent} is not "
                                  f"writable ({exc.strerror}); choose another --output") from exc
        try:
            self._open(fingerprint, compression, teacher_config, dataset, split, batch_size, teacher, data_root, extra_attrs)
        except BaseException:
            self._lock.release()
            raise
        self.attrs: Dict[str, Any] = {k: _attr(v) for k, v in self._file.attrs.items()}
        self.batch_size = int(self.attrs["batch_size"])
        self._offsets = self._file["masks/offsets"][:] if masks is not None else None

    def _open(self, fingerprint: TeacherFingerprint, compression: Optional[str], teacher_config: Mapping[str, Any],
              dataset: str, split: str, batch_size: int, teacher: str, data_root: str,
              extra_attrs: Optional[Mapping[str, Any]]) -> None:
        if self.path.exists():
            self._file = self._reopen(fingerprint)
            codec.add_stats_datasets(self._file, self.specs, len(self.image_ids))  # also to files from before statistics
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
                        alloc_dataset(group, s.name + codec.SCALES[key], (n, *shape), codec.SCALE_DTYPE, (1, *shape), compression)

    def mask_bytes(self) -> int:
        """Bytes of the mask datasets of this plan (0 without masks)."""
        if self.masks is None:
            return 0
        n = len(self.image_ids)
        return int(self.masks.offsets[-1]) * codec.mask_bytes(self.storage, self.mask_side, self.with_flip) + 9 * n + 8

    def _create_masks(self) -> None:
        """The mask datasets of :attr:`masks` (module docstring), preallocated; offsets, label_index and
        cls written now, ``masks_done`` all False."""
        assert self.masks is not None
        f, plan, side = self._file, self.masks, self.mask_side
        offsets = plan.offsets
        m = int(offsets[-1])
        g = f.require_group(MASK_GROUPS[False])
        g.create_dataset("offsets", data=offsets)
        g.create_dataset("label_index", data=np.concatenate([np.arange(len(c)) for c in plan.cls] + [np.zeros(0)]).astype(np.int64))
        g.create_dataset("cls", data=np.concatenate([np.asarray(c, np.int64) for c in plan.cls] + [np.zeros(0, np.int64)]))
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
                raise CacheLockedError(f"{self.path} is open in another process ({exc}); wait for it to finish or stop it, "
                                       f"then rerun this command, or write to another --output") from exc
            raise CacheMismatchError(f"cannot open the existing cache {self.path} ({exc}): it is truncated or not an "
                                     f"HDF5 file. {fix}") from exc
        if "fingerprint" not in f.attrs or "image_ids" not in f:
            f.close()
            raise CacheMismatchError(f"{self.path} is an HDF5 file but not a vfmkd feature cache (no fingerprint or "
                                     f"image_ids); it is left untouched. Write to another --output, or move it away.")
        try:
            storage, flip = stored_layout(f.attrs)
            if (storage, flip) != (self.storage, self.with_flip):
                raise CacheMismatchError(
                    f"{self.path} was started with {layout_flags(storage, flip)}, this run has {layout_flags(self.storage, self.with_flip)}. "
                    f"Resume it with the first run's flags, or: {fix}"
                )
            version = _attr(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSIONS[storage]:
                raise CacheMismatchError(
                    f"{self.path} has cache format {version}, this vfmkd writes {FORMAT_VERSIONS[storage]} for --storage {storage}. {fix}")
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
            if "masks" in f.attrs:
                info = json.loads(_attr(f.attrs["masks"]))
                if self.masks is None:
                    raise CacheMismatchError(
                        f"{self.path} was started with --outputs features,masks, this run has --outputs features. "
                        f"Resume it with --outputs features,masks, or: {fix}")
                if info.get("labels_sha256") != self.masks.labels_sha256 or info.get("prompt_source") != self.masks.prompt_source:
                    raise CacheMismatchError(
                        f"{self.path} holds mask logits prompted with other labels: the label files changed since it "
                        f"was started ({info.get('prompt_source')} sha256 {info.get('labels_sha256')}, now "
                        f"{self.masks.prompt_source} sha256 {self.masks.labels_sha256}). {fix}")
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
            raise CacheWriteError(exc.errno, f"writing images {start}.. to the cache {self.path} failed ({exc}): free "
                                  f"space there and rerun the same command (it resumes), or write to another --output") from exc

    def _write(self, start: int, features: Mapping[str, torch.Tensor], affine: torch.Tensor, valid_hw: torch.Tensor,
               orig_hw: np.ndarray, flip: Optional[Tuple[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor]],
               masks: Optional[Mapping[bool, Tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        n = affine.shape[0]
        stop, f = start + n, self._file
        for flipped, (logits, boxes) in (masks or {}).items():
            a, b = self.mask_rows(start, stop)
            side = self.mask_side
            if tuple(logits.shape) != (b - a, side, side) or tuple(boxes.shape) != (b - a, 4):
                raise ValueError(f"mask logits {tuple(logits.shape)} / boxes {tuple(boxes.shape)} of images {start}..{stop - 1}: "
                                 f"the cache expects ({b - a}, {side}, {side}) / ({b - a}, 4) (their label rows)")
            try:
                enc = codec.encode_masks(logits, self.storage)
            except ValueError as exc:
                raise ValueError(f"mask logits{' (flip pass)' if flipped else ''} of images {start}..{stop - 1}: {exc}") from None
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
                    raise ValueError(f"teacher returned '{s.name}' of shape {tuple(t.shape)}, the cache expects {(n,) + ds.shape[1:]}")
                try:
                    enc = codec.encode(t, self.storage)
                except ValueError as exc:
                    raise ValueError(f"'{s.name}'{' (flip pass)' if flipped else ''} of images {start}..{stop - 1}: {exc}") from None
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

    def __enter__(self) -> "FeatureCacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
        self._ds: Dict[str, Tuple[Any, ...]] = {}  # per process: dataset, direct?, shape, dtype, chunk offset
        self._stats: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        try:  # metadata through a short-lived handle: nothing stays open to be inherited by workers
            with h5py.File(self.path, "r") as f:
                self.attrs: Dict[str, Any] = {k: _attr(v) for k, v in f.attrs.items()}
                self.image_ids: List[str] = list(f["image_ids"].asstr()[:])
                self.orig_hw = f["orig_hw"][:]
                self.done = f["done"][:]
                self.storage, self.has_flip = stored_layout(self.attrs)
                self.mask_info: Optional[Dict[str, Any]] = json.loads(self.attrs["masks"]) if "masks" in self.attrs else None
                if self.mask_info is not None:
                    self.mask_offsets = f["masks/offsets"][:]
                    self.masks_done = f["masks_done"][:]
                self._geometry = {flipped: (f[a][:], f[v][:]) for flipped, (_, a, v) in _FLIP.items() if a in f}
                for name, g in f.get("stats", {}).items():
                    mean, std = g["mean"][:], g["std"][:]
                    if np.isfinite(mean).all() and np.isfinite(std).all():  # NaN: the cache is not finished
                        self._stats[name] = (mean, std)
        except (OSError, KeyError) as exc:
            cmd = rebuild or (f"{TOOL} --splits {shlex.quote(self.path.stem)} --output {shlex.quote(str(self.path.parent))} "
                              f"--teacher <teacher> (+ the --dataset, --features, --storage and teacher.key=value settings it was built with)")
            what = ("is not a vfmkd feature cache (no fingerprint/image_ids)" if isinstance(exc, KeyError)
                    else "is truncated or not an HDF5 file")
            raise CacheMismatchError(f"cannot read the feature cache {self.path}: it {what} ({exc}). Rebuild it (delete "
                                     f"{self.path} first, or write to another --output):\n  {cmd}") from exc
        version = self.attrs.get("format_version")
        if self.storage not in FORMAT_VERSIONS or version != FORMAT_VERSIONS[self.storage]:
            raise CacheMismatchError(f"{self.path} has cache format {version} (storage {self.storage}), this vfmkd reads "
                                     f"{', '.join(f'{v} ({k})' for k, v in FORMAT_VERSIONS.items())}; rebuild it")
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.fingerprint_dict: Dict[str, Any] = json.loads(self.attrs["fingerprint"])
        self.teacher_config: Dict[str, Any] = json.loads(self.attrs["teacher_config"])
        self.feature_specs = tuple(FeatureSpec(**d) for d in json.loads(self.attrs["feature_specs"]))
        self.input_size = int(self.attrs["input_size"])

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
                f"{self.path}: the cached mask logits are stale: the detection label files in {label_dir} changed since "
                f"they were prompted with them (labels sha256 {self.mask_info.get('labels_sha256')}, now {now}). Rebuild "
                f"the cache (delete {self.path} first, or write to another --output):\n  {self.rebuild_command()}")

    def bytes_per_image(self) -> Tuple[int, int]:
        return bytes_per_image(self.feature_specs, self.input_size, self.storage, self.has_flip)

    def _h5(self) -> h5py.File:
        pid = os.getpid()
        if self._pid != pid:  # first use in this process (e.g. a forked DataLoader worker)
            if self._handle is not None:
                _INHERITED.append(self._handle)  # the parent's: closing it here could unlock the parent's file
            self._handle, self._pid, self._ds = h5py.File(self.path, "r"), pid, {}
        return self._handle

    def __getstate__(self) -> Dict[str, Any]:  # spawn workers / pickling: never ship a handle
        state = dict(self.__dict__)
        state["_handle"], state["_pid"], state["_ds"] = None, None, {}
        return state

    def _array(self, key: str, i: int) -> np.ndarray:
        """Image ``i`` of dataset ``key``; one-chunk-per-image unfiltered data is read as a raw chunk
        (skips HDF5's selection machinery: ~3x faster on a warm page cache)."""
        f = self._h5()
        if key not in self._ds:
            ds = f[key]
            direct = ds.chunks == (1,) + ds.shape[1:] and ds.id.get_create_plist().get_nfilters() == 0
            self._ds[key] = (ds, direct, ds.shape[1:], ds.dtype, (0,) * (ds.ndim - 1))
        ds, direct, shape, dtype, zeros = self._ds[key]
        if not direct:
            return ds[i]
        out = np.empty(shape, dtype)
        ds.id.read_direct_chunk((i, *zeros), out=out.reshape(-1).view(np.uint8))
        return out

    def index_of(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise CacheMismatchError(f"image {image_id!r} is not in {self.path}; fill it with:\n  {self.rebuild_command()}") from None

    def missing_ids(self, ids: Sequence[str]) -> List[str]:
        """The ids that are not in the cache or not written yet (done=False)."""
        return [i for i in ids if i not in self._index or not self.done[self._index[i]]]

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
            raise CacheMismatchError(f"image {image_id!r} is not written yet in {self.path}; finish it with:\n  {self.rebuild_command()}")
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
        out = {"label_index": torch.from_numpy(f["masks/label_index"][a:b]), "cls": torch.from_numpy(f["masks/cls"][a:b]),
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
            f"{self.path}: the cached '{key}' of image {image_id!r} holds {bad} non-finite value(s) (NaN/inf): the file "
            f"is damaged (disk or copy error; vfmkd never writes them). This is not a learning-rate problem. Rebuild the "
            f"cache (delete {self.path} first, or write to another --output):\n  {self.rebuild_command()}")

    def stats(self, name: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Per-channel (mean, std) float32 (C,) of feature ``name`` over the valid cells of every image
        (plain pass, values as read); None for files without statistics or not finished yet."""
        if name not in {s.name for s in self.feature_specs}:
            raise KeyError(f"{self.path} caches {', '.join(s.name for s in self.feature_specs)}, not {name!r}")
        got = self._stats.get(name)
        return None if got is None else (torch.from_numpy(got[0].copy()), torch.from_numpy(got[1].copy()))

    def rebuild_command(self, data_root: Optional[str] = None, teacher_config: Optional[Mapping[str, Any]] = None,
                        limit: Optional[int] = None, with_flip: Optional[bool] = None, masks: Optional[bool] = None) -> str:
        """The tool command for this file (its storage, flip pass, features and outputs); teacher overrides
        from ``teacher_config`` (default: the cached one). ``masks=True``: the command that adds mask
        logits (``--outputs features,masks``; it reopens this file and fills them, resumably)."""
        cfg = self.teacher_config if teacher_config is None else teacher_config
        teacher = self.attrs.get("teacher") or cfg.get("type") or self.teacher_config.get("type", "?")
        return rebuild_command(teacher, self.attrs.get("dataset", "?"), self.attrs.get("split", "?"), str(self.path.parent),
                               data_root or self.attrs.get("data_root") or None, cfg, limit, self.storage,
                               self.has_flip if with_flip is None else with_flip, [s.name for s in self.feature_specs],
                               ("features", "masks") if (self.mask_info is not None if masks is None else masks) else ("features",),
                               int((self.mask_info or {}).get("num_classes", 80)))

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
        self._handle, self._pid, self._ds = None, None, {}
