#!/usr/bin/env python
"""Memory and speed levers of online distillation: step time and peak memory per lever.

    python benchmarks/bench_levers.py            # SAM ViT-B live @ 1024 vs levers, YOLOv8n @ 640, batch 4
    python benchmarks/bench_levers.py --quick    # SAM @ 512, YOLOv8n @ 320, batch 2 (< 2 min on 2 cores)

Each lever runs in its own subprocess (peak memory is per process): a real
``vfmkd.engine.training.trainer.Trainer`` from configs/experiments/yolov8_sam_coco128.yaml with the SAM teacher
live on every batch (``teachers.sam.offline=false``: the ``TeacherRouter`` sends each batch to the live
model), one warm-up epoch, then a timed ``train_one_epoch``. Reported: median seconds per training step
(distill_interval=k is amortised over k steps), peak process memory (max RSS; on CUDA also
``torch.cuda.max_memory_allocated``), and the teacher pass alone (peak memory above the loaded
model) for the input-size claim. Random-init SAM (no weights here): the compute is the real model's.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import _common  # noqa: F401  (sys.path)

LEVERS = [
    ("baseline (live teacher every step)", []),
    ("teacher.input_size = half", ["HALF"]),
    ("distillation.distill_interval=4", ["distillation.distill_interval=4"]),
    ("teacher.device=cpu", ["teachers.sam.device=cpu"]),
    ("train.accumulate=2 (half batch)", ["train.accumulate=2", "HALF_BATCH"]),
    ("train.amp=true (bf16 autocast)", ["train.amp=true"]),
]


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(args) -> None:
    import torch
    from _common import quiet

    from vfmkd.core.config import load_experiment
    from vfmkd.engine.training.trainer import Trainer

    torch.set_num_threads(2)
    quiet()
    if args.teacher_only:
        from vfmkd.datasets import load_rgb
        from vfmkd.teachers import SamTeacher
        t = SamTeacher(init="random", input_size=args.teacher_size, device="cuda" if torch.cuda.is_available() else
                       "cpu")
        imgs = [
            load_rgb(p)
            for p in sorted((_common.REPO / "datasets/coco128/images/train2017").glob("*.jpg"))[: args.batch]
        ]
        before = rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        t.extract_features(imgs)
        secs = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = {"seconds": secs, "peak_above_model_mb": peak - before}
        if torch.cuda.is_available():
            out["cuda_peak_above_model_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        print("RESULT " + json.dumps(out))
        return
    overrides = [o for o in json.loads(args.child) if o not in ("HALF", "HALF_BATCH")]
    size = args.teacher_size // 2 if "HALF" in args.child else args.teacher_size
    batch = args.batch // 2 if "HALF_BATCH" in args.child else args.batch
    cfg = load_experiment(_common.REPO / "configs/experiments/yolov8_sam_coco128.yaml", [
        "teachers.sam.offline=false", "teachers.sam.init=random", f"teachers.sam.input_size={size}",
        f"data.limit={args.images}", f"data.img_size={args.img_size}", f"data.batch_size={batch}", "data.num_workers=0",
        f"work_dir={tempfile.mkdtemp()}", "eval.fidelity=false", *overrides,
    ])
    trainer = Trainer(cfg, progress=False)
    quiet()
    cuda = trainer.device.type == "cuda"
    trainer.train_one_epoch(0)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train_one_epoch(1)
    if cuda:
        torch.cuda.synchronize()
    steps = len(trainer.train_loader)
    images_per_step = batch / args.batch  # accumulate=2 runs half batches: report per full batch of images
    out = {"step_s": (time.perf_counter() - start) / steps / images_per_step,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def run_child(extra) -> dict:
    from _common import run_result_child

    return run_result_child(__file__, extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-size", type=int, default=1024)
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--teacher-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.teacher_size, a.img_size, a.batch, a.images = 512, 320, 2, 8
    if a.child or a.teacher_only:
        child(a)
        return
    from _common import machine
    common = ["--teacher-size", str(a.teacher_size), "--img-size", str(a.img_size), "--batch", str(a.batch),
              "--images", str(a.images)]
    print(f"machine: {machine()}")
    print(f"SAM ViT-B live (random init) @ {a.teacher_size}, YOLOv8n @ {a.img_size}, batch {a.batch}, "
          f"{a.images} images per timed epoch (one warm-up epoch)")
    print(f"| lever | s / step (batch of {a.batch}) | vs baseline | peak RSS MiB | CUDA peak MiB |")
    print("|---|---|---|---|---|")
    base = None
    for label, overrides in LEVERS:
        r = run_child(common + ["--child", json.dumps(overrides)])
        base = base or r["step_s"]
        print(f"| {label} | {r['step_s']:.2f} | {r['step_s'] / base:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r.get('cuda_peak_mb', float('nan')):.0f} |")
    print()
    print("| teacher pass alone | seconds | peak memory above the model (MiB) |")
    print("|---|---|---|")
    full = run_child(["--teacher-only", "--teacher-size", str(a.teacher_size), "--batch", str(a.batch)])
    half = run_child(["--teacher-only", "--teacher-size", str(a.teacher_size // 2), "--batch", str(a.batch)])
    key = "cuda_peak_above_model_mb" if "cuda_peak_above_model_mb" in full else "peak_above_model_mb"
    for size, r in ((a.teacher_size, full), (a.teacher_size // 2, half)):
        print(f"| SAM ViT-B @ {size}, batch {a.batch} | {r['seconds']:.2f} | {r[key]:.0f} |")
    print(f"input {a.teacher_size // 2} vs {a.teacher_size}: teacher memory "
          f"-{100 * (1 - half[key] / max(full[key], 1e-9)):.0f} % (design claim: about -75 %), time "
          f"-{100 * (1 - half['seconds'] / full['seconds']):.0f} %")


if __name__ == "__main__":
    main()
