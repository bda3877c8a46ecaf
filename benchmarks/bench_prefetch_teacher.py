#!/usr/bin/env python
"""Online and mixed training throughput with the live teacher serial vs prefetched, side by side.

    python benchmarks/bench_prefetch_teacher.py            # SAM ViT-B @ 256 live, YOLOv8n @ 320, 16 images, 3 repeats
    python benchmarks/bench_prefetch_teacher.py --quick    # 8 images, 1 repeat (a smoke run)
    python benchmarks/bench_prefetch_teacher.py --device cuda --teacher-size 1024 --img-size 640   # on a GPU

One process builds five real ``Trainer``s from configs/experiments/yolov8_sam_coco128.yaml that differ
only in ``distillation.offline_ratio`` (1.0 offline, 0.0 online, r mixed) and ``train.teacher_prefetch``
(off = serial, on = the live passes of the next batches overlap the student's step), then times whole
training epochs (``Trainer.train_one_epoch``) in rotating order. Reported: online and mixed prefetch ÷
serial, and mixed prefetch ÷ the ideal serial mix ``1 / (r/T_offline + (1-r)/T_online_serial)`` at the
offline fraction r the router drew (issue 21's goal: >= 1.3 on 2 cores). The teacher is a random-init
SAM (no weights here): the compute is the real model's. The last line is ``RESULT {json}``.

It also prints the ceiling ANY overlap (threads, processes) can reach on this machine: the offline and
online serial epochs are timed again with half the threads, the share each side gets when the teacher and
the student run at once. With student-only epoch O_k and teacher part L_k = (online epoch - O_k) at k
threads, a fraction f of live batches (1 online, 1 - r mixed), n = --threads and h = n/2:
serial = O_n + f L_n; a half/half overlap = max(O_h, f L_h); perfect packing of the same work on the
two halves = (O_h + f L_h) / 2. serial / packing is the best speed-up any scheduler can give here.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path)
import torch
from _common import build_cache, machine, median, quiet

from vfmkd.core.config import load_experiment
from vfmkd.engine.training.trainer import Trainer

EXPERIMENT = _common.REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
RUNS = (("offline", 1.0, "off"), ("online serial", 0.0, "off"), ("online prefetch", 0.0, "on"),
        ("mixed serial", None, "off"), ("mixed prefetch", None, "on"))


def build(a: argparse.Namespace, work: Path, cache: Path, ratio: float, prefetch: str) -> Trainer:
    cfg = load_experiment(EXPERIMENT, [
        f"teachers.sam.feature_path={cache}", "teachers.sam.init=random", f"teachers.sam.input_size={a.teacher_size}",
        f"data.limit={a.images}", f"data.img_size={a.img_size}", f"data.batch_size={a.batch}", "data.num_workers=0",
        f"distillation.offline_ratio={ratio}", f"work_dir={work / 'runs'}", "train.epochs=100",
        f"train.device={a.device}", f"teachers.sam.device={a.device}", "eval.fidelity=false",
        f"train.teacher_prefetch={prefetch}", f"train.teacher_prefetch_depth={a.depth}",
        f"train.teacher_threads={a.teacher_threads}"])
    trainer = Trainer(cfg, progress=False)
    quiet()
    return trainer


def overlap_ceiling(trainers: dict, times: dict, a: argparse.Namespace) -> dict:
    """Speed-ups over serial that a half/half overlap and a perfect packing could reach (see the docstring)."""
    if a.device != "cpu" or a.threads < 2:
        return {}
    half = {}
    torch.set_num_threads(a.threads // 2)
    try:
        for label in ("offline", "online serial"):
            epochs = []
            for r in range(max(1, a.repeats)):
                start = time.perf_counter()
                trainers[label].train_one_epoch(100 + r)
                epochs.append(time.perf_counter() - start)
            half[label] = median(epochs)
    finally:
        torch.set_num_threads(a.threads)
    full_off, full_on = median(times["offline"]), median(times["online serial"])
    counts = trainers["mixed prefetch"].router.summary()["sam"]
    live = counts.get("online", 0) / max(1, counts.get("offline", 0) + counts.get("online", 0))
    out = {"half_threads_epoch_s": half}
    for run, f in (("online", 1.0), ("mixed", live)):
        serial = full_off + f * (full_on - full_off)
        student, teacher = half["offline"], f * (half["online serial"] - half["offline"])
        out[run] = {"half_half": serial / max(student, teacher), "packing": serial / ((student + teacher) / 2)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--depth", type=int, default=2, help="train.teacher_prefetch_depth")
    p.add_argument("--teacher-threads", type=int, default=0, help="train.teacher_threads (0: half the cores)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the process (the CPU budget)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per run (0: a smoke run)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.repeats = 8, 1
    torch.set_num_threads(a.threads)
    quiet()
    work = Path(tempfile.mkdtemp(prefix="vfmkd_prefetch_"))
    cache = build_cache(work / "sam", a.teacher_size, a.images)
    trainers = {label: build(a, work, cache, a.ratio if ratio is None else ratio, prefetch)
                for label, ratio, prefetch in RUNS}
    for t in trainers.values():  # warm-up epochs
        for _ in range(a.warmup):
            t.train_one_epoch(0)
    times = {k: [] for k in trainers}
    order = list(trainers)
    for r in range(a.repeats):
        for label in order[r % len(order):] + order[:r % len(order)]:
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainers[label].train_one_epoch(r + 1)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)
    bound = overlap_ceiling(trainers, times, a)
    n = len(trainers["offline"].train_set)
    thr = {k: n / median(v) for k, v in times.items()}
    counts = trainers["mixed prefetch"].router.summary()["sam"]
    drawn = counts.get("offline", 0) / max(1, counts.get("offline", 0) + counts.get("online", 0))
    ideal = 1.0 / (drawn / thr["offline"] + (1 - drawn) / thr["online serial"])
    result = {"images_per_s": thr, "online_prefetch_over_serial": thr["online prefetch"] / thr["online serial"],
              "mixed_prefetch_over_serial": thr["mixed prefetch"] / thr["mixed serial"],
              "mixed_prefetch_over_ideal_serial_mix": thr["mixed prefetch"] / ideal, "drawn_offline": drawn,
              "depth": a.depth, "teacher_threads": a.teacher_threads, "threads": a.threads,
              "overlap_ceiling": bound,
              "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if a.device.startswith("cuda") else None}
    print(f"machine: {machine()}")
    print(f"SAM ViT-B @ {a.teacher_size} (random init) live, YOLOv8n @ {a.img_size}, batch {a.batch}, "
          f"{n} images/epoch, {a.repeats} timed epochs per run, prefetch depth {a.depth}, "
          f"teacher threads {a.teacher_threads or 'auto'} of {a.threads}")
    for k in trainers:
        print(f"  {k:16s} {thr[k]:7.2f} images/s   (median epoch {median(times[k]):.2f} s)")
    print(f"  online: prefetch / serial = {result['online_prefetch_over_serial']:.3f}")
    print(f"  mixed (offline_ratio {a.ratio}, drew offline {drawn:.2f}): prefetch / serial = "
          f"{result['mixed_prefetch_over_serial']:.3f}; prefetch / ideal serial mix ({ideal:.2f} images/s) = "
          f"{result['mixed_prefetch_over_ideal_serial_mix']:.3f} (goal >= 1.3)")
    if bound:
        print(f"  ceiling of any overlap here (epochs re-timed at {a.threads // 2} threads): "
              + "; ".join(f"{k}: half/half {v['half_half']:.2f}x, perfect packing {v['packing']:.2f}x"
                          for k, v in ((run, bound[run]) for run in ("online", "mixed"))))
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
