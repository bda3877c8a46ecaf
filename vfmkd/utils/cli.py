"""Shared command-line plumbing of the tools: ``--config`` plus dotted ``key=value`` overrides."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from vfmkd.core.errors import CacheMismatchError, CheckpointError, ConfigError, DatasetError
from vfmkd.utils.logging import get_logger, setup_logging

USER_ERRORS = (ConfigError, CheckpointError, CacheMismatchError, DatasetError, FileNotFoundError)

OVERRIDES_HELP = (
    "dotted overrides of the config, Hydra style, e.g. train.epochs=3 data.batch_size=8 data.limit=16 "
    "work_dir=/tmp/runs teachers.sam.input_size=512; an unknown key is an error that names the closest valid key"
)


def experiment_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/experiments/yolov8_sam_coco128.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    return parser


def run_tool(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's main; user mistakes print one clear message and exit 2, no traceback."""
    setup_logging()
    try:
        return main(argv)
    except USER_ERRORS as exc:
        get_logger().error("%s", exc)
        return 2
    except KeyboardInterrupt:
        get_logger().error("interrupted")
        return 130


def entry(main: Callable[[Optional[Sequence[str]]], int]) -> None:
    sys.exit(run_tool(main))
