#!/usr/bin/env python
"""Teacher extraction speed: SAM's encoder stock vs fast (teacher.backend), fp32 vs bf16, side by side.

    python benchmarks/bench_teacher_backend.py                   # SAM ViT-B @ 512 on the CPU, fp32, batch 2
    python benchmarks/bench_teacher_backend.py --quick           # @ 256, 1 repeat (a smoke run)
    python benchmarks/bench_teacher_backend.py --device cuda --size 1024 --batch 8 --dtypes float32,bfloat16
    python benchmarks/bench_teacher_backend.py --family sam2 --device cuda --size 1024 --dtypes float32,bfloat16

One teacher per dtype (random init: the compute is the real model's), its encoder switched between
backends in place (``SamTeacher.use_backend``: the same weights), timed on the same preprocessed
coco128 batch in alternating order. ``--compile`` also times the fast backend under ``torch.compile``.
SAM2's Hiera already computes attention with SDPA in Meta's library: it has one backend (``stock``),
timed per dtype. Reported: images/s of ``forward_features`` per (backend, dtype), fast ÷ stock per
dtype, and on CUDA the peak GPU memory of each. The last line is ``RESULT {json}``.
"""
from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401  (sys.path)
import numpy as np
import torch
from _common import machine, median, quiet
from PIL import Image

from vfmkd.teachers import Sam2Teacher, SamTeacher


def images(n: int) -> list:
    paths = sorted((_common.REPO / "datasets" / "coco128" / "images" / "train2017").glob("*.jpg"))[:n]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def timed(teacher, pixels: torch.Tensor, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    teacher.forward_features(pixels)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=("sam", "sam2"), default="sam")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time backend fast + torch.compile")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.repeats = 256, 1
    torch.set_num_threads(a.threads)
    quiet()
    cuda = a.device.startswith("cuda")
    variants = ["stock", "fast"] + (["fast+compile"] if a.compile else []) if a.family == "sam" else ["stock"]
    result: dict = {"family": a.family, "size": a.size, "batch": a.batch, "device": a.device, "runs": {}}
    for dtype in a.dtypes.split(","):
        built = {}
        for variant in variants:  # fast+compile is its own teacher (compiled at build); the others share one
            if variant == "stock" and "fast" in built:
                continue
            kwargs = dict(init="random", input_size=a.size, device=a.device, dtype=dtype)
            if a.family == "sam":
                built[variant] = SamTeacher(**kwargs, compile=variant == "fast+compile")
            else:
                built[variant] = Sam2Teacher(**kwargs)
        if "fast" in built:
            built["stock"] = built["fast"]
        batch = built[variants[0]].preprocess(images(a.batch)).pixels.to(a.device)
        times = {v: [] for v in variants}
        peaks = {}
        for r in range(a.repeats + 1):  # the first round warms up (and compiles)
            for variant in (variants if r % 2 else variants[::-1]):
                teacher = built[variant]
                if a.family == "sam":
                    teacher.use_backend("stock" if variant == "stock" else "fast")
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                seconds = timed(teacher, batch, cuda)
                if r:
                    times[variant].append(seconds)
                if cuda:
                    peaks[variant] = torch.cuda.max_memory_allocated() / 2**20
        for variant in variants:
            result["runs"][f"{variant}/{dtype}"] = {"images_per_s": a.batch / median(times[variant]),
                                                     "peak_gpu_mib": peaks.get(variant)}
        del built
    print(f"machine: {machine()}")
    print(f"{a.family} random init @ {a.size}, batch {a.batch}, {a.repeats} timed passes each, {a.device}")
    for key, run in result["runs"].items():
        peak = f", peak GPU {run['peak_gpu_mib']:.0f} MiB" if run["peak_gpu_mib"] is not None else ""
        print(f"  {key:24s} {run['images_per_s']:8.2f} images/s{peak}")
    for dtype in a.dtypes.split(","):
        runs = result["runs"]
        if f"fast/{dtype}" in runs:
            ratio = runs[f"fast/{dtype}"]["images_per_s"] / runs[f"stock/{dtype}"]["images_per_s"]
            result[f"fast_over_stock/{dtype}"] = ratio
            print(f"  {dtype}: fast / stock = {ratio:.3f}")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
