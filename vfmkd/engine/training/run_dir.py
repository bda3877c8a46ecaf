"""Run directories: ``work_dirs/<experiment>/<timestamp>/`` with config, log, checkpoints, metrics."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from vfmkd.core.config import save_config
from vfmkd.utils.checkpoint import publish_copy
from vfmkd.utils.logging import get_logger, setup_logging
from vfmkd.utils.stop_signals import rerun_command


def create_run_dir(work_dir: str | Path, experiment: str) -> Path:
    base = Path(work_dir) / experiment
    stamp = time.strftime("%Y%m%d_%H%M%S")
    run = base / stamp
    n = 1
    while run.exists():  # two runs started within the same second
        run = base / f"{stamp}_{n}"
        n += 1
    (run / "checkpoints").mkdir(parents=True)
    return run


def remove_unused_run_dir(run: Path, worth_keeping: Sequence[str]) -> bool:
    """Remove ``run`` (a run directory a tool just made) and its experiment folder when that is left
    empty, unless a file matching one of the ``worth_keeping`` globs exists (the tool stopped before
    writing anything a user needs: a config error found late, a signal). True when removed."""
    if not run.is_dir() or any(next(run.glob(pattern), None) for pattern in worth_keeping):
        return False
    shutil.rmtree(run, ignore_errors=True)
    with contextlib.suppress(OSError):
        run.parent.rmdir()
    return True


def write_run_config(run_dir: Path, cfg: Dict[str, Any]) -> None:
    tmp = run_dir / ".config.yaml.tmp"
    save_config(cfg, tmp)
    tmp.replace(run_dir / "config.yaml")  # atomic, like every file a run writes


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    tmp.replace(path)  # atomic: a killed run never leaves half a metrics file


def publish_best_twin(best: Path, epoch: int, tag: str) -> None:
    """best.pt's named twin ``best_epoch{E}_{metric}{value}.pt`` (the previous twin removed)."""
    named = best.with_name(f"best_epoch{epoch}_{tag}.pt")
    for old in best.parent.glob("best_epoch*.pt"):
        if old != named:
            old.unlink(missing_ok=True)
    publish_copy(best, named)


def continue_line(run_dir: Path, ctx: Any, removed: bool) -> str:
    """What a stopped run tells its user: the command that continues it, or that nothing was saved
    (``removed``: the run directory this process made was removed, see :func:`remove_unused_run_dir`)."""
    last = run_dir / "checkpoints" / "last.pt"
    if not ctx.is_main:
        return "rank 0 saves the run"
    if removed and not last.exists():
        return f"the run stopped before its first checkpoint, nothing was saved; start it again: {rerun_command()}"
    launcher = (f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', ctx.world_size)}"
                if ctx.enabled else "python")
    return f"{last} holds the run; continue it with: {launcher} {sys.argv[0] or 'tools/train.py'} --resume {run_dir}"


def discard_unsaved_run(run: Optional[Path], writer: Any = None) -> bool:
    """Remove ``run``, the run directory this process created, when the run stops (a config error found
    after it was made, a signal, a crash) before any checkpoint was written: nothing in it is worth
    keeping. ``writer`` (the run's loggers) and train.log are closed first. True when removed."""
    if run is None or any((run / "checkpoints").glob("*.pt")):
        return False
    if writer is not None:
        writer.close()
    setup_logging(None)  # closes train.log
    if not remove_unused_run_dir(run, ("checkpoints/*.pt",)):
        return False
    get_logger().info("removed the run directory %s: the run stopped before writing a checkpoint", run)
    return True
