#!/usr/bin/env python
"""Throughput of offline-only, online-only and mixed (offline_ratio=r) training, side by side.

    python benchmarks/bench_mixed_throughput.py            # SAM ViT-B @ 512, YOLOv8n @ 320, 32 images
    python benchmarks/bench_mixed_throughput.py --quick    # SAM @ 256, 16 images, < 60 s on 2 cores

One process builds three real ``vfmkd.engine.training.trainer.Trainer``s from
configs/experiments/yolov8_sam_coco128.yaml that differ only in ``distillation.offline_ratio``
(1.0, 0.0, r), then times whole training epochs (``Trainer.train_one_epoch``: data loading through
``CachedTargetsDataset``, teacher passes, student step; no evaluation) in rotating order over repeats.
The mixed run is compared with the ideal ``1 / (r/T_offline + (1-r)/T_online)`` where ``r`` is
the offline fraction the ``TeacherRouter`` actually drew (``router.summary()``). Goal: mixed / ideal >= 0.9.
The teacher is a random-init SAM (no weights here): the compute is the real model's.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path)
import torch
from _common import build_cache, machine, median, quiet

from vfmkd.core.config import load_experiment
from vfmkd.engine.training.trainer import Trainer

EXPERIMENT = _common.REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-size", type=int, default=512)
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.teacher_size, a.images, a.repeats = 256, 16, 2
    torch.set_num_threads(2)
    quiet()
    work = Path(tempfile.mkdtemp(prefix="vfmkd_mix_"))
    cache = build_cache(work / "sam", a.teacher_size, a.images)
    trainers = {}
    for label, ratio in (("offline", 1.0), ("online", 0.0), ("mixed", a.ratio)):
        cfg = load_experiment(EXPERIMENT, [
            f"teachers.sam.feature_path={cache}", "teachers.sam.init=random",
            f"teachers.sam.input_size={a.teacher_size}",
            f"data.limit={a.images}", f"data.img_size={a.img_size}", f"data.batch_size={a.batch}", "data.num_workers=0",
            f"distillation.offline_ratio={ratio}", f"work_dir={work / 'runs'}", "train.epochs=100",
            "eval.fidelity=false",  # no evaluation here: no validation router
        ])
        trainers[label] = Trainer(cfg, progress=False)
        quiet()
    for t in trainers.values():  # warm-up epoch each
        t.train_one_epoch(0)
    times = {k: [] for k in trainers}
    order = list(trainers)
    for r in range(a.repeats):
        for label in order[r % 3:] + order[:r % 3]:
            start = time.perf_counter()
            trainers[label].train_one_epoch(r + 1)
            times[label].append(time.perf_counter() - start)
    n = len(trainers["offline"].train_set)
    thr = {k: n / median(v) for k, v in times.items()}
    counts = trainers["mixed"].router.summary()["sam"]  # routes (offline/online) and online reasons
    drawn = counts.get("offline", 0) / max(1, counts.get("offline", 0) + counts.get("online", 0))
    ideal = 1.0 / (drawn / thr["offline"] + (1 - drawn) / thr["online"])
    nominal = 1.0 / (a.ratio / thr["offline"] + (1 - a.ratio) / thr["online"])
    print(f"machine: {machine()}")
    print(f"SAM ViT-B @ {a.teacher_size} (random init), YOLOv8n @ {a.img_size}, batch {a.batch}, {n} images/epoch, "
          f"{a.repeats} timed epochs per mode")
    for k in ("offline", "online", "mixed"):
        print(f"  {k:8s} {thr[k]:7.2f} images/s   (median epoch {median(times[k]):.2f} s)")
    print(f"  mixed drew offline for {drawn:.2f} of batches (nominal {a.ratio}); router counts {counts}")
    print(f"  ideal at drawn r: {ideal:.2f} images/s -> mixed / ideal = {thr['mixed'] / ideal:.3f} (goal >= 0.9)")
    print(f"  ideal at nominal r: {nominal:.2f} images/s -> mixed / ideal = {thr['mixed'] / nominal:.3f}")
    print(f"  online / offline = {thr['online'] / thr['offline']:.3f}")


if __name__ == "__main__":
    main()
