#!/usr/bin/env python
"""DSRL resolution distillation (issue 9, item 3): peak memory and step time of a RegNetX-200MF +
semantic_head student without DSRL and with DSRL at sr_target_scale 2.0 / 1.5 / 1.2 (SR branch at
full resolution, DSRL's, and with ``use_low_res_sr``).

    python benchmarks/bench_dsrl.py            # canvas 384, batch 4, 5 rounds
    python benchmarks/bench_dsrl.py --quick    # canvas 192, batch 2, 3 rounds

Setup: one ``Trainer`` per configuration on the same coco128 train2017 batch (first images, no
teacher), the step = ``Trainer.train_step`` (student forward on the canvas downscaled inside the
model, distiller: semantic CE+Dice [+ the DSRL term], backward) + optimizer step. For each DSRL
scale the same trainer is measured twice: "lowres" = the DSRL term switched off with
``distiller.set_stage`` (the low-resolution student alone, what runs at inference) and "dsrl" = on;
"SR" = dsrl - lowres is the SR branch's cost. "full" = DSRL disabled: the student on the whole canvas.
Rounds interleave every configuration (order rotated each round); medians are reported.

Memory (CPU, no CUDA here): the peak of the running sum of the CPU allocator's allocation/free events
recorded by ``torch.profiler`` (``profile_memory=True``, allocation nodes of its event tree) over one step, i.e.
the step's peak of bytes allocated above what was live when it began (activations, gradients, optimizer state
on the first step excluded by a warm-up step). tracemalloc does not see torch's C++ allocations, so it is not used.

Part 2 (``fixed input``): the design's "1.5 instead of 2.0 cuts the SR memory ~44 %" is (1.5/2)^2 =
0.56 of the SR output area *for a fixed student input*; with a fixed canvas the SR target is the
canvas at every scale. So it is also measured with the student input fixed at 128 (canvas 256 for
2.0, 192 for 1.5; 1.2 gives no canvas that is a multiple of 32).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vfmkd.core.config import experiment_from_dict  # noqa: E402
from vfmkd.engine.training.trainer import Trainer  # noqa: E402


def make_trainer(work: Path, img: int, batch: int, scale: float, low_res: bool, mode: str = "single",
                 device: str = "cpu") -> Trainer:
    raw = {
        "experiment_name": "bench_dsrl", "work_dir": str(work),
        "model": {"backbone": {"type": "regnet", "config": "configs/backbones/regnetx_002.yaml"},
                  "neck": {"type": "yolov8_pafpn", "depth": 1},
                  "heads": {"semantic": {"type": "semantic_head", "num_classes": 130, "output_stride": 8}},
                  "resolution_distill": {"enabled": scale > 1, "sr_target_scale": scale if scale > 1 else 2.0,
                                         "use_low_res_sr": low_res, "mode": mode}},
        "distillation": {"losses": {"semantic_segmentation": {"head": "semantic"}}, "standardize": False},
        "data": {"dataset": "coco128", "root": str(REPO / "datasets/coco128"), "img_size": img, "limit": batch,
                 "batch_size": batch, "num_workers": 0},
        "train": {"epochs": 1, "device": device, "vis_interval": 0, "loggers": []},
        "eval": {"fidelity": False},
    }
    return Trainer(experiment_from_dict(raw), progress=False)


def step(trainer: Trainer, item) -> None:
    trainer.train_step(item, 1)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def peak_bytes(trainer: Trainer, item) -> int:
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(trainer, item)
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # every allocator event (alloc > 0, free < 0) of the step, in time order
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, nbytes in sorted(allocs):
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(configs: Dict[str, Tuple[Trainer, bool]], rounds: int) -> Dict[str, Tuple[float, float]]:
    items = {}
    for name, (trainer, _) in configs.items():
        trainer.model.train()
        trainer.distiller.train()
        items[name] = next(iter(trainer.train_loader))
    times: Dict[str, List[float]] = {n: [] for n in configs}
    mems: Dict[str, List[int]] = {n: [] for n in configs}
    names = list(configs)
    for r in range(rounds + 1):  # round 0 warms up (optimizer state, allocator, oneDNN kernels)
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            trainer, on = configs[name]
            trainer.distiller.set_stage(None if on else ["semantic_segmentation"])
            t = time.perf_counter()
            step(trainer, items[name])
            dt = time.perf_counter() - t
            if r:
                times[name].append(dt)
    for name in names:  # memory is deterministic: one profiled step each (the profiler slows steps down)
        trainer, on = configs[name]
        trainer.distiller.set_stage(None if on else ["semantic_segmentation"])
        mems[name].append(peak_bytes(trainer, items[name]))
    return {n: (statistics.median(times[n]), statistics.median(mems[n]) / 2 ** 20) for n in names}


def table(results: Dict[str, Tuple[float, float]], pairs: List[Tuple[str, str, str]]) -> List[str]:
    lines = ["| configuration | step ms | peak MiB |", "|---|---:|---:|"]
    lines += [f"| {n} | {t * 1e3:.0f} | {m:.1f} |" for n, (t, m) in results.items()]
    lines += ["", "| scale | SR branch: + time | + memory | SR memory MiB |", "|---|---:|---:|---:|"]
    for label, low, dsrl in pairs:
        (t0, m0), (t1, m1) = results[low], results[dsrl]
        lines.append(f"| {label} | {100 * (t1 / t0 - 1):+.1f} % | {100 * (m1 / m0 - 1):+.1f} % | {m1 - m0:.1f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    img, batch, rounds = (192, 2, 3) if args.quick else (384, 4, 5)
    logging.getLogger("vfmkd").setLevel(logging.ERROR)
    torch.manual_seed(0)
    out: List[str] = [f"canvas {img}, batch {batch}, {rounds} rounds, {torch.get_num_threads()} threads"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        configs: Dict[str,
                      Tuple[Trainer, bool]] = {"full (no DSRL)": (make_trainer(work, img, batch, 1.0, False), False)}
        pairs = []
        for scale in (2.0, 1.5, 1.2):
            for low_res in (False, True):
                tr = make_trainer(work, img, batch, scale, low_res)
                tag = f"{scale:g}{' low_res_sr' if low_res else ''}"
                if not low_res:
                    configs[f"lowres {scale:g} (SR off)"] = (tr, False)
                configs[f"dsrl {tag}"] = (tr, True)
                pairs.append((tag, f"lowres {scale:g} (SR off)", f"dsrl {tag}"))
        res = measure(configs, rounds)
        out += ["", "### Fixed canvas", ""] + table(res, pairs)
        print("\n".join(out), flush=True)
        out = []
        fixed: Dict[str, Tuple[Trainer, bool]] = {}
        fixed_pairs = []
        for scale, canvas in ((2.0, 256), (1.5, 192)):
            tr = make_trainer(work, canvas, batch, scale, False)
            fixed[f"lowres {scale:g} (SR off) canvas {canvas}"] = (tr, False)
            fixed[f"dsrl {scale:g} canvas {canvas}"] = (tr, True)
            fixed_pairs.append((f"{scale:g}", f"lowres {scale:g} (SR off) canvas {canvas}",
                                f"dsrl {scale:g} canvas {canvas}"))
        res2 = measure(fixed, rounds)
        out += ["", "### Fixed student input 128", ""] + table(res2, fixed_pairs)
        print("\n".join(out), flush=True)
        out = []
        sr = {s: res2[d][1] - res2[low][1] for s, low, d in fixed_pairs}
        if sr["2"] > 0:
            out.append(f"\nSR memory 1.5 vs 2.0 at a fixed student input: {100 * (1 - sr['1.5'] / sr['2']):.0f} % less "
                   f"(design: ~44 %)")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
