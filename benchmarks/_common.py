"""Shared helpers of the benchmark scripts (not part of the library)."""
from __future__ import annotations

import contextlib
import io
import logging
import platform
import sys
from pathlib import Path
from typing import List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}, python {platform.python_version()}"


def quiet() -> None:
    """Only warnings from vfmkd while timing."""
    logging.getLogger("vfmkd").setLevel(logging.WARNING)


def build_cache(out: Path, size: int, limit: int, with_flip: bool = False, quiet_tool: bool = True) -> Path:
    """Write a random-init SAM ViT-B cache of the first ``limit`` coco128 train images with the real tool."""
    import prepare_teacher_features as ptf

    if (out / "train2017.h5").is_file():
        return out
    args = ["--teacher", "sam", "--splits", "train2017", "--limit", str(limit), "--batch-size", "4",
            "--output", str(out), "--no-progress", "teacher.init=random", f"teacher.input_size={size}"]
    if with_flip:
        args.insert(0, "--with-flip")
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet_tool else contextlib.nullcontext():
        assert ptf.main(args) == 0
    return out


def median(values: List[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
