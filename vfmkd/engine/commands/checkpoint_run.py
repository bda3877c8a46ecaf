"""The run a checkpoint belongs to and the config a command reads it with (test, export, predict)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from vfmkd.core.config import experiment_from_dict, read_yaml
from vfmkd.core.errors import ConfigError
from vfmkd.utils.checkpoint import load_checkpoint


def run_dir_of(checkpoint: Path) -> Optional[Path]:
    """``<run>/checkpoints/x.pt`` -> ``<run>`` when that is a vfmkd run directory."""
    run = checkpoint.resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None


def resolve_config(checkpoint: Path, config: Optional[str], overrides: Sequence[str]) -> Tuple[Dict[str, Any], str]:
    """The experiment config of ``checkpoint`` and where it came from: ``config``, else the run's
    config.yaml next to checkpoints/, else the config stored in the checkpoint."""
    if config is None:
        run = run_dir_of(checkpoint)
        if run is not None:
            config = str(run / "config.yaml")
    if config is not None:
        return experiment_from_dict(read_yaml(config), overrides, config), config
    stored = load_checkpoint(checkpoint).get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"{checkpoint} is not inside a run directory and stores no config; pass --config "
                          "<run>/config.yaml")
    return experiment_from_dict(stored, overrides,
                                f"{checkpoint} (stored config)"), f"the config stored in {checkpoint}"
