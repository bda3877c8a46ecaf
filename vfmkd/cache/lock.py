"""The writer's lock on a feature cache (``<cache>.lock``), the process-liveness checks it takes over
dead writers' locks with, and the checks made before a cache file is created (its folder, free space)."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict

from vfmkd.cache.format import CacheWriteError
from vfmkd.core.errors import CacheMismatchError

LOGGER = logging.getLogger("vfmkd")


class CacheLockedError(CacheMismatchError):
    """Another live process is writing this cache (its lock file names the process)."""


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

    def acquire(self) -> CacheLock:
        for _ in range(3):  # a lock released or taken over between our attempts: try again
            if self._create():
                return self
            owner = self._owner()
            pid, host = owner.get("pid"), owner.get("host")
            if not isinstance(pid, int) or host != socket.gethostname() or _alive(pid, owner.get("start", "")):
                if not owner and not self.path.exists():
                    continue
                known = isinstance(pid, int) and host == socket.gethostname()
                who = (
                    f"process {pid} on {host}"
                    if isinstance(pid, int)
                    else "another process (its lock names no process yet)"
                )
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


def make_cache_dir(folder: Path) -> None:
    """mkdir -p ``folder``, or a CacheWriteError saying why not (a file in the way, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise CacheWriteError(exc.errno, f"cannot create the cache folder {folder}: {exc.filename or folder} is a "
                              f"file, not a folder; give --output a folder (or a .h5 path)") from exc
    except NotADirectoryError as exc:
        raise CacheWriteError(exc.errno, f"cannot create the cache folder {folder}: part of that path is a file "
                              f"({exc}); give --output a folder") from exc
    except OSError as exc:
        raise CacheWriteError(exc.errno, f"cannot create the cache folder {folder} ({exc.strerror or exc}); "
                              f"choose another --output") from exc
