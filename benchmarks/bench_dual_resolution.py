#!/usr/bin/env python
"""Dual-path resolution distillation (issue 19): step time and peak memory of a RegNetX-200MF + semantic_head
student with no resolution distillation (the full-resolution step), ``mode: single`` (DSRL: the student
sees the canvas / 2 only) and ``mode: dual`` (the canvas and the canvas / 2, shared weights, SR + FA),
side by side on the same coco128 batch; prints the table and the ratios dual / none and dual / single
(seed 001: dual costs about +30 % memory and 10-15 % speed against a plain step).

    python benchmarks/bench_dual_resolution.py                  # canvas 384, batch 4, 5 rounds, CPU
    python benchmarks/bench_dual_resolution.py --quick          # canvas 192, batch 2, 3 rounds
    python benchmarks/bench_dual_resolution.py --device cuda    # GPU: torch.cuda.max_memory_allocated

The step = ``Trainer.train_step`` (forward(s), semantic CE + Dice [+ the resolution term], backward) +
optimizer step; rounds interleave the configurations (order rotated), medians reported. Memory: on CUDA
the step's peak allocated above what was live before it; on CPU the same from the allocator events
``torch.profiler`` records (``bench_dsrl.peak_bytes``).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dsrl import make_trainer, peak_bytes, step  # noqa: E402

CONFIGS = (("none (full resolution)", 1.0, "single"), ("single (DSRL, 1/2)", 2.0, "single"),
           ("dual (full + 1/2)", 2.0, "dual"))


def cuda_peak(trainer, item) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(trainer, item)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(trainers: Dict[str, object], rounds: int, cuda: bool) -> Dict[str, Tuple[float, float]]:
    items = {}
    for name, trainer in trainers.items():
        trainer.model.train()
        trainer.distiller.train()
        items[name] = next(iter(trainer.train_loader))
    times: Dict[str, List[float]] = {n: [] for n in trainers}
    names = list(trainers)
    for r in range(rounds + 1):  # round 0 warms up (optimizer state, allocator, kernels)
        for name in names[r % len(names):] + names[:r % len(names)]:
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(trainers[name], items[name])
            if cuda:
                torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - t)
    peak = {n: (cuda_peak if cuda else peak_bytes)(trainers[n], items[n]) for n in names}
    return {n: (statistics.median(times[n]), peak[n] / 2 ** 20) for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="canvas 192, batch 2, 3 rounds")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--img", type=int, default=None, help="canvas size (default 384, --quick 192)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 4, --quick 2)")
    args = ap.parse_args(argv)
    img, batch, rounds = (192, 2, 3) if args.quick else (384, 4, 5)
    img, batch = args.img or img, args.batch or batch
    logging.getLogger("vfmkd").setLevel(logging.ERROR)
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(Path(tmp), img, batch, scale, False, mode, args.device)
                    for name, scale, mode in CONFIGS}
        res = measure(trainers, rounds, cuda)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"canvas {img}, batch {batch}, {rounds} rounds, {device}", "",
             "| configuration | step ms | peak MiB |", "|---|---:|---:|"]
    lines += [f"| {n} | {t * 1e3:.1f} | {m:.1f} |" for n, (t, m) in res.items()]
    (tn, mn), (ts, ms), (td, md) = (res[n] for n, _, _ in CONFIGS)
    lines += ["", f"dual / none:   time x{td / tn:.2f}, memory x{md / mn:.2f}",
              f"dual / single: time x{td / ts:.2f}, memory x{md / ms:.2f}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
