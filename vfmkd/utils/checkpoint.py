"""The one safe checkpoint loader of vfmkd, plus file hashing and state-dict unwrapping.

Every checkpoint goes through :func:`load_checkpoint`, which only ever calls
``torch.load(..., weights_only=True)``: a checkpoint can never execute code on load, and there is
deliberately no unsafe fallback. Failures become :class:`CheckpointError` messages naming the fix.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from vfmkd.core.errors import CheckpointError

PathLike = Union[str, os.PathLike]

_CHUNK = 1 << 20  # 1 MiB: hashing streams, multi-GB checkpoints never sit in memory
_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()

# Keys under which training frameworks commonly nest the weights (SAM2 uses {"model": ...}).
_WRAPPER_KEYS = ("model", "state_dict")


def _human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"  # unreachable


def sha256_of_file(path: PathLike) -> str:
    """Hex sha256 of a file, streamed; memoised on (absolute path, size, mtime) so a changed
    file is re-hashed while repeated calls on a multi-GB checkpoint cost nothing."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = value
    return value


def _refused_message(path: Path, err: Exception) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    what = f" (it references {found.group(1)})" if found else ""
    return (
        f"checkpoint {path} was refused: it contains pickled Python objects{what}, not only tensors. "
        "vfmkd loads checkpoints with torch.load(weights_only=True) and never loads such files unsafely, "
        "because unpickling can run arbitrary code. If you trust the file's source, re-save its plain "
        "state_dict once and point the config at the new file:\n"
        f"  python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = c.get('model', c.get('state_dict', c)) if isinstance(c, dict) else c.state_dict(); "
        f"torch.save({{k: v for k, v in sd.items() if torch.is_tensor(v)}}, '{path.with_suffix('')}"
        ".state_dict.pth')\""
    )


def load_checkpoint(path: PathLike, *, download_hint: Optional[str] = None, mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True``; returns the top-level dict.

    ``download_hint`` is the command that fetches the file (e.g.
    ``python tools/download_weights.py --model sam_vit_b``); it is named when the file is missing
    or corrupt. ``mmap``: map the tensors' bytes instead of reading them (for reading shapes only;
    files in torch's legacy format are read as usual). Raises :class:`CheckpointError` for a missing,
    truncated/corrupt or pickle-carrying file, or one whose top level is not a dict.
    """
    p = Path(path)
    if not p.exists():
        fix = f"download it with `{download_hint}`" if download_hint else "check the path"
        raise CheckpointError(f"checkpoint not found: {p} (absolute: {p.resolve()}); {fix}.")
    if not p.is_file():
        raise CheckpointError(f"checkpoint path {p} is not a file.")
    size = p.stat().st_size
    redownload = f" with `{download_hint}`" if download_hint else ""
    if p.suffix == ".safetensors":  # tensors only, no pickle (NVIDIA's RADIO release); mmap is its default
        try:
            from safetensors.torch import load_file

            return dict(load_file(str(p), device="cpu"))
        except Exception as err:  # a damaged header or a truncated file
            raise CheckpointError(_corrupt_message(p, size, err, redownload)) from None
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not (mmap and "zipfile" in str(err)):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(_refused_message(p, err)) from None
        raise CheckpointError(_corrupt_message(p, size, err, redownload)) from None
    except (PermissionError, IsADirectoryError) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: {err}") from None
    except Exception as err:  # zip/EOF/key errors of a damaged file all mean the same to the user
        raise CheckpointError(_corrupt_message(p, size, err, redownload)) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {p} holds a {type(obj).__name__}, not a dict of tensors; save a state_dict "
            "(torch.save(model.state_dict(), path))."
        )
    return dict(obj)


def _corrupt_message(p: Path, size: int, err: Exception, redownload: str) -> str:
    reason = str(err).split("\n")[0][:200] or type(err).__name__
    return (
        f"checkpoint {p} is truncated or corrupt ({_human_size(size)}, {size} bytes on disk; torch says: "
        f"{type(err).__name__}: {reason}). An interrupted download or copy is the usual cause: delete it "
        f"and re-download{redownload}."
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()
    )


def unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Return the ``{name: tensor}`` state_dict inside a loaded checkpoint.

    Accepts a plain state_dict or the common wrappers ``{"model": sd}`` / ``{"state_dict": sd}``
    (extra keys such as optimiser state or epoch are ignored). A ``module.`` prefix on every key
    (left by DataParallel/DDP) is stripped.
    """
    if _is_state_dict(obj):
        sd = dict(obj)
    else:
        inner = None
        if isinstance(obj, Mapping):
            for key in _WRAPPER_KEYS:
                if key in obj and _is_state_dict(obj[key]):
                    inner = obj[key]
                    break
        if inner is None:
            keys = list(obj)[:8] if isinstance(obj, Mapping) else []
            raise CheckpointError(
                "checkpoint is not a state_dict: expected {name: tensor} or a wrapper "
                f"{{'model': state_dict}} / {{'state_dict': state_dict}}, got a {type(obj).__name__}"
                + (f" with keys {keys}" if keys else "")
                + "."
            )
        sd = dict(inner)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _non_finite(state: Any, prefix: str = "") -> Optional[str]:
    """The first key path holding a NaN/inf floating tensor, or None."""
    if isinstance(state, torch.Tensor):
        return prefix or "<tensor>" if state.is_floating_point() and not torch.isfinite(state).all() else None
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, f"{prefix}.{k}" if prefix else str(k))
        if found:
            return found
    return None


def previous_of(path: PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the file it replaced (``last.pt`` -> ``last.prev.pt``)."""
    p = Path(path)
    return p.with_name(f"{p.stem}.prev{p.suffix}")


def save_checkpoint(path: PathLike, state: Mapping[str, Any], keep_previous: bool = False) -> Path:
    """Write ``state`` atomically: to a temp file in the same folder, fsynced, then renamed, so a
    kill mid-save leaves the previous file intact. A NaN/inf tensor is refused (CheckpointError),
    never written. ``keep_previous`` moves the replaced file to :func:`previous_of` first (a
    fallback should the new one ever be damaged later, e.g. a truncating copy)."""
    path = Path(path)
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f"refusing to write {path}: {bad} holds NaN/inf values")
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_of(path))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def publish_copy(src: PathLike, dst: PathLike) -> Path:
    """Make ``dst`` hold what ``src`` holds now, atomically: a hard link (no second write of the
    bytes) where the filesystem allows, else a copy, first under a temp name then renamed. Later
    replacements of ``src`` (atomic renames) leave ``dst`` untouched."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (e.g. some network filesystems)
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
