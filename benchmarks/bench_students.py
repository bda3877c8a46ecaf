"""Student zoo: size, compute and CPU training speed of every backbone config.

One row per ``configs/backbones/*.yaml`` (the backbone alone, random init):
* params (M);
* GFLOPs of one forward at ``--flops-size`` (640) x same, batch 1, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; 2 FLOPs per
  multiply-add, the convention of ultralytics' "GFLOPs"). Elementwise work is not counted by it; for
  the mamba students the selective scans' elementwise FLOPs (VMamba's 9·B·L·D·N count) are added
  and shown separately in brackets;
* training images/s on CPU: forward + backward of the sum of the outputs, batch ``--batch`` (2)
  at ``--size`` (320), the best of ``--iters`` timed iterations after ``--warmup`` (the best, not
  the median: on a shared machine other processes only ever slow an iteration down).

    python benchmarks/bench_students.py            # all configs
    python benchmarks/bench_students.py --quick    # 1 warm-up, 2 timed iterations
    python benchmarks/bench_students.py --configs yolov8n vit_tiny mamba_tiny
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Dict, List

import torch
import yaml
from _common import REPO, machine, quiet
from torch.utils.flop_counter import FlopCounterMode

import vfmkd.models  # noqa: F401,E402  (registers the backbones)
from vfmkd.core.registry import BACKBONES  # noqa: E402

CONFIGS = REPO / "configs" / "backbones"


def build(config: Path) -> torch.nn.Module:
    entry = yaml.safe_load(config.read_text())
    return BACKBONES.build(entry.pop("type"), where=str(config.relative_to(REPO)), **entry)


def count_flops(model: torch.nn.Module, size: int) -> Dict[str, float]:
    model.eval()
    x = torch.rand(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    extra = float(model.scan_flops(1, size, size)) if hasattr(model, "scan_flops") else 0.0
    return {"counted": counter.get_total_flops() / 1e9, "scan": extra / 1e9}


def train_speed(model: torch.nn.Module, size: int, batch: int, warmup: int, iters: int) -> float:
    model.train()
    x = torch.rand(batch, 3, size, size)
    times: List[float] = []
    for i in range(warmup + iters):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(x)
        sum(f.float().mean() for f in out.values()).backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch / min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", help="config names (file stems) to run; default: every config")
    parser.add_argument("--size", type=int, default=320, help="training-speed input size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--flops-size", type=int, default=640)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed iterations")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.iters = 1, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet()
    configs = sorted(CONFIGS.glob("*.yaml"))
    if args.configs:
        known = {c.stem: c for c in configs}
        unknown = [c for c in args.configs if c not in known]
        if unknown:
            parser.error(f"unknown config(s) {unknown}; have {sorted(known)}")
        configs = [known[c] for c in args.configs]

    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start (other processes skew the speeds)")
    print(f"GFLOPs: torch.utils.flop_counter.FlopCounterMode, batch 1 at {args.flops_size}x{args.flops_size} "
          f"(+ selective-scan elementwise FLOPs for mamba, in brackets); speed: forward+backward, batch {args.batch} "
          f"at {args.size}x{args.size}, best of {args.iters} after {args.warmup} warm-up\n")
    header = (f"| config | type | levels (C@stride) | params (M) | GFLOPs @{args.flops_size} "
              f"| train img/s @{args.size} (CPU, bs {args.batch}) |")
    print(header)
    print("|---|---|---|---:|---:|---:|")
    for config in configs:
        model = build(config)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        flops = count_flops(model, args.flops_size)
        speed = train_speed(model, args.size, args.batch, args.warmup, args.iters)
        gflops = f"{flops['counted'] + flops['scan']:.1f}"
        if flops["scan"]:
            gflops += f" ({flops['scan']:.1f} scan)"
        levels = " ".join(f"{s.channels}@{s.stride}" for s in model.feature_specs())
        entry_type = yaml.safe_load(config.read_text())["type"]
        print(f"| {config.stem} | {entry_type} | {levels} | {params:.2f} | {gflops} | {speed:.2f} |", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
