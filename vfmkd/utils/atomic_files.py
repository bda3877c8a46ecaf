"""Atomic writes: a run's artefacts (pictures, text reports) appear under their final name whole or
not at all (checkpoints: :func:`vfmkd.utils.checkpoint.save_checkpoint`)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_output(path: Union[str, Path]) -> Iterator[Path]:
    """A temp path beside ``path`` (parent folders created) that replaces ``path`` with
    :func:`os.replace` when the block succeeds and is removed otherwise: a reader (TensorBoard, a
    user's image viewer, a killed run) never sees a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
