"""Learnable-fusion overhead (issue 9): training-step time of a RegNet student whose fusion_fpn neck
uses ``fusion: learnable`` (EfficientDet's fast normalised fusion) vs ``fusion: sum``, same
everything else (same backbone weights, same neck convs, same head, same input).

A step: forward of the whole student (regnetx_002 -> fusion_fpn -> yolo_head), backward of the
mean of the head's raw outputs (the task loss is the same for both and left out), AdamW step.
The two models alternate step by step (interleaved: a load change on a shared machine hits both),
``--warmup`` steps each first; the medians of ``--iters`` steps each are compared. On CPU the
clock is the process's CPU time at 1 thread by default (``--clock cpu``: what the step computes,
not how long other processes held the cores; ``--clock wall`` for wall time); on CUDA, wall time
with synchronisation.

    python benchmarks/bench_fusion.py            # 30 timed steps each, batch 4 at 320
    python benchmarks/bench_fusion.py --quick    # 10 timed steps each, batch 2 at 192
    python benchmarks/bench_fusion.py --device cuda --size 640 --batch 16
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch
from _common import machine, median, quiet

from vfmkd.models.unified_model import UnifiedModel  # noqa: E402


def build(fusion: str, channels: int) -> UnifiedModel:
    torch.manual_seed(0)  # same weights for every conv: the models differ by the fusion parameters only
    return UnifiedModel.from_config({
        "backbone": {"type": "regnet", "variant": "regnetx_002"},
        "neck": {"type": "fusion_fpn", "channels": channels, "fusion": fusion},
        "heads": {"detection": {"type": "yolo_head", "num_classes": 80}},
    })


def step(model: UnifiedModel, opt: torch.optim.Optimizer, x: torch.Tensor, device: torch.device, clock) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    out = model(x).heads["detection"]
    loss = sum(t.float().mean() for t in out.values() if torch.is_tensor(t))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=64, help="fusion_fpn channels")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="CPU device: process CPU time or wall time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="batch 2 at 192, 2 warm-up and 10 timed steps each")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.warmup, args.iters = 192, 2, 2, 10
    torch.set_num_threads(args.threads)
    quiet()
    device = torch.device(args.device)
    clock = time.process_time if device.type == "cpu" and args.clock == "cpu" else time.perf_counter
    clock_name = "process CPU time" if clock is time.process_time else "wall time"
    models = {f: build(f, args.channels).to(device).train() for f in ("learnable", "sum")}
    n_params = {f: sum(p.numel() for p in m.parameters()) for f, m in models.items()}
    extra = n_params["learnable"] - n_params["sum"]
    opts = {f: torch.optim.AdamW(m.parameters(), lr=1e-4) for f, m in models.items()}
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    times: Dict[str, List[float]] = {f: [] for f in models}
    for i in range(args.warmup + args.iters):
        order = list(models) if i % 2 == 0 else list(reversed(models))  # neither always runs first
        for f in order:
            t = step(models[f], opts[f], x, device, clock)
            if i >= args.warmup:
                times[f].append(t)
    med = {f: median(v) for f, v in times.items()}
    overhead = 100.0 * (med["learnable"] / med["sum"] - 1.0)
    print(f"machine: {machine()}")
    print(f"regnetx_002 + fusion_fpn (channels {args.channels}) + yolo_head, batch {args.batch} at {args.size}, "
          f"{args.iters} interleaved steps each on {device} ({clock_name}); learnable adds {extra} parameters")
    print("| fusion | median step (ms) | min (ms) |")
    print("|---|---:|---:|")
    for f in models:
        print(f"| {f} | {1000 * med[f]:.1f} | {1000 * min(times[f]):.1f} |")
    best = 100.0 * (min(times["learnable"]) / min(times["sum"]) - 1.0)
    print(f"learnable vs sum: {overhead:+.2f} % (median); {best:+.2f} % (min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
