"""Run directories: ``work_dirs/<experiment>/<timestamp>/`` with config, log, checkpoints, metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict

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


def write_run_config(run_dir: Path, cfg: Dict[str, Any]) -> None:
    tmp = run_dir / ".config.yaml.tmp"
    save_config(cfg, tmp)
    tmp.replace(run_dir / "config.yaml")  # atomic, like every file a run writes


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    tmp.replace(path)  # atomic: a killed run never leaves half a metrics file
