"""Run directories: ``work_dirs/<experiment>/<timestamp>/`` with config, log, checkpoints, metrics."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Sequence

from vfmkd.core.config import save_config


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
