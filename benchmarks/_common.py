"""Shared helpers of the benchmark scripts (not part of the library)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def quiet() -> None:
    """Only warnings from vfmkd while timing."""
    logging.getLogger("vfmkd").setLevel(logging.WARNING)


def build_cache(out: Path, size: int, limit: int, with_flip: bool = False, quiet_tool: bool = True) -> Path:
    """Write a random-init SAM ViT-B cache of the first ``limit`` coco128 train images with the real tool."""
    from vfmkd.engine.commands import prepare_features as ptf

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


def alternate_steps(step: Callable[[str, Any], float], names: Sequence[str], batches: Sequence[Any], repeats: int,
                    ratio: Tuple[str, str], after_repeat: Optional[Callable[[int, Dict[str, List[float]]], None]] = None
                    ) -> Tuple[Dict[str, List[float]], List[float]]:
    """Time ``step(name, batch)`` of every variant on the same batches, ``repeats`` times, alternating
    which variant goes first (so caches and drifts favour neither). Returns (seconds per variant,
    per-batch ratios ``ratio[0] / ratio[1]`` of the paired steps); ``after_repeat(r, times)`` reports."""
    times: Dict[str, List[float]] = {n: [] for n in names}
    pairs: List[float] = []
    for r in range(repeats):
        for k, batch in enumerate(batches):
            order = list(names) if (r + k) % 2 == 0 else list(names)[::-1]
            got = {n: step(n, batch) for n in order}
            for n in names:
                times[n].append(got[n])
            pairs.append(got[ratio[0]] / got[ratio[1]])
        if after_repeat is not None:
            after_repeat(r, times)
    return times, pairs


def run_result_child(script: str, argv: Sequence[str]) -> Dict[str, Any]:
    """Run ``script`` with ``argv`` in a fresh process (its own peak memory) with the teacher-pass malloc
    settings, and return the JSON it printed on its ``RESULT `` line; RuntimeError with its stderr tail."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="17179869184", MALLOC_TRIM_THRESHOLD_="17179869184")
    res = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{script} exited {res.returncode}: {res.stderr[-3000:]}")
