"""Where an export is written, and how: the default name, the refusal of a path that would replace a
training checkpoint, and the atomic write (a temp file beside the target, fsynced, renamed) that
leaves no temp file behind after an error, Ctrl-C or SIGTERM (``utils.stop_signals`` turns both into an
exception, so the ``finally`` here runs), and sweeps those of exports killed outright (SIGKILL).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.utils.checkpoint import load_checkpoint

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript", "ultralytics": ".pt", "ultralytics_onnx": ".onnx"}
#: The names tools/train.py gives the checkpoints in a run's checkpoints/ folder (last.pt, its
#: last.prev.pt, best.pt, best_epoch{E}_{metric}{value}.pt, checkpoint_epoch{E}.pt); an export never
#: takes one of them (an ultralytics export's default, <name>.ultralytics.pt, is not one).
RUN_CHECKPOINT_NAME = re.compile(
    r"^(?!.*\.ultralytics\.pt$)(last|last\.prev|best|best_epoch\d+_.*|checkpoint_epoch\d+)\.pt$"
)


def default_output(checkpoint: Path, fmt: str) -> Path:
    """``<run>/checkpoints/best.pt`` -> ``<run>/checkpoints/best.onnx`` (``best.torchscript``,
    ``best.ultralytics.pt``)."""
    stem = checkpoint.with_suffix("")
    special = {"ultralytics": ".ultralytics.pt", "ultralytics_onnx": ".ultralytics.onnx"}
    return stem.with_name(stem.name + special.get(fmt, SUFFIXES[fmt]))


def refuse_checkpoint_output(output: Path, checkpoint: Path, fmt: str) -> None:
    """ConfigError when writing ``output`` would replace a vfmkd checkpoint: the exported checkpoint
    itself, a file named as the trainer names checkpoints inside a ``checkpoints/`` folder, or any
    existing file that loads as a vfmkd training checkpoint (a ``model`` entry of tensors)."""
    output, checkpoint = Path(output), Path(checkpoint)
    fix = f"pass another --output (the default is {default_output(checkpoint, fmt)})"
    if output.exists() and checkpoint.exists() and output.resolve() == checkpoint.resolve():
        raise ConfigError(f"--output {output} is the checkpoint being exported; writing it would destroy the "
                          f"training state: {fix}")
    if output.parent.name == "checkpoints" and RUN_CHECKPOINT_NAME.match(output.name):
        raise ConfigError(f"--output {output} is a run checkpoint's name (tools/train.py writes and resumes from "
                          f"{output.name} in checkpoints/); writing it could destroy the training state: {fix}")
    if output.is_file():
        try:
            state = load_checkpoint(output)
        except CheckpointError:
            return  # not a vfmkd checkpoint (an earlier export, an ultralytics pickle): replaceable
        if isinstance(state.get("model"), dict) and "config" in state:
            raise ConfigError(f"--output {output} is a vfmkd training checkpoint; an export never replaces one: {fix}")


def _temp_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp{pid}")


def remove_stale_temps(path: Path) -> None:
    """Remove ``.<name>.tmp<pid>`` files beside ``path`` whose process is gone (an export killed with
    SIGKILL, which no handler can catch)."""
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        stale.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path``; renamed onto it (after an fsync) when the block succeeds, removed
    otherwise (an error, Ctrl-C, SIGTERM), so a failed or stopped export never leaves a partial file
    under the final name. A folder that cannot take the file is one ConfigError naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file name (e.g. {path / 'model.onnx'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output {path}: cannot create the folder {path.parent} ({exc.strerror or exc}); "
                          "pass another --output") from None
    remove_stale_temps(path)
    tmp = _temp_name(path, os.getpid())
    try:
        with open(tmp, "wb"):  # can a file be created here at all? (a read-only or virtual folder: /proc)
            pass
    except OSError as exc:
        raise ConfigError(f"--output {path}: cannot write a file in {path.parent} ({exc.strerror or exc}); "
                          "pass another --output") from None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
