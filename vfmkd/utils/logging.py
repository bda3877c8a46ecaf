"""The ``vfmkd`` logger: console lines that do not break tqdm bars, plus a run's ``train.log``."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

LOGGER_NAME = "vfmkd"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never kill a run
            self.handleError(record)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(log_file: Optional[Path] = None, level: int = logging.INFO) -> logging.Logger:
    """Console handler once per process; a file handler per ``log_file`` (replacing older ones)."""
    logger = get_logger()
    logger.setLevel(level)
    logger.propagate = True  # lets pytest's caplog see records
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        console = _TqdmHandler()
        console.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        logger.addHandler(console)
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(h)
        h.close()
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(fh)
    return logger


def banner(logger: logging.Logger, lines: list[str], level: int = logging.WARNING) -> None:
    """A message nobody scrolls past."""
    bar = "!" * 78
    logger.log(level, "\n".join([bar, *[f"!!  {line}" for line in lines], bar]))
