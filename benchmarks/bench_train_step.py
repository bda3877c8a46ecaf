#!/usr/bin/env python
"""Train-step cost of offline feature distillation: student-only step vs offline-distill step.

    python benchmarks/bench_train_step.py            # YOLOv8n @ 640 and 320, batch 8, SAM cache @ 512
    python benchmarks/bench_train_step.py --quick    # < 60 s (320 only, cache @ 256, fewer steps)

Both variants run in ONE process on the same batches of real coco128 images, alternating step by
step (who goes first flips every repeat), after warm-up steps; medians over all timed steps:

* student-only: YOLOv8n forward + ultralytics v8DetectionLoss + backward + grad clip + AdamW step
  (+ LR scheduler step): the body of ``Trainer.train_one_epoch`` for one batch (``Trainer.train_step``:
  ``batch.to(device)``, ``router.targets``, forward under ``_autocast()``, ``distiller(...).total.backward()``;
  then ``clip_grad_norm_(trainer.params)``, optimizer and scheduler steps), on a real
  ``vfmkd.engine.training.trainer.Trainer`` built from configs/experiments/yolov8_sam_coco128.yaml with the
  feature loss and the teacher removed.
* offline-distill: the same Trainer step with the experiment's feature loss (teacher maps standardised
  with the cache's per-channel stats, 1x1 adapter on P4, resampled onto the student grid, masked MSE)
  against the cached SAM ``image_embeddings`` already in the ``DistillBatch`` (``TeacherRouter.targets``
  routes every batch offline: no augmentation, ``offline_ratio=1``; checked after timing).

Each variant is its own ``Trainer`` (model + optimizer), built from the same seed. The cache is written first
by the real tool (``tools/prepare_teacher_features.py``, ``teacher.init=random``: meaningless features,
real shapes) and read through ``CachedTargetsDataset`` + ``collate_distill`` like training does; the
model step is timed with the batches already in memory. Separately, the per-batch cost of the HDF5
read in the data path (``dataset[i]`` + collate: ``CachedTargetsDataset`` + ``collate_distill`` vs the
plain ``DetectionDataset`` + ``collate_samples``, num_workers=0) is timed.

Goal: t_student_only / t_offline_distill >= 0.95.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def apply_malloc_mode(mode: str) -> str:
    env = dict(os.environ)
    if mode == "tuned":
        want = {**env, **MALLOC_ENV}
    elif mode == "default":
        want = {k: v for k, v in env.items() if k not in MALLOC_ENV}
    else:
        want = env
    if want != env and not env.get("_VFMKD_BENCH_REEXEC"):
        want["_VFMKD_BENCH_REEXEC"] = "1"
        os.execve(sys.executable, [sys.executable] + sys.argv, want)
    tuned = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    return "tuned (MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=16GiB)" if tuned else "glibc default"


def _cpu_snapshot():
    """(system busy CPU seconds from /proc/stat, this process + children CPU seconds, wall)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()


def foreign_cores(start) -> float:
    """Average cores used by OTHER processes (or stolen by the hypervisor) since ``start``."""
    b0, o0, w0 = start
    b1, o1, w1 = _cpu_snapshot()
    return max(0.0, ((b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9))


def idle_note(start) -> str:
    other = foreign_cores(start)
    verdict = "machine idle" if other < 0.1 else "WARNING: machine NOT idle, timings are contaminated"
    return f"other processes used {other:.2f} cores on average during the measurement ({verdict})"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--img-sizes", type=int, nargs="+", default=[640, 320], help="student input sizes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4, help="distinct batches (images = batches * batch size)")
    p.add_argument("--repeats", type=int, default=6, help="passes over the batches per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--teacher-input", type=int, default=512, help="SAM input size of the cache (512 or 1024)")
    p.add_argument("--cache-dir", default=None,
                   help="cache folder (default work_dirs/bench_cache/sam_vit_b_<S>_random_n<N>; reused when present)")
    p.add_argument("--read-repeats", type=int, default=5, help="passes of the data-path (HDF5 read) timing")
    p.add_argument("--device", default="cpu", help="train.device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=("tuned", "default", "inherit"), default="tuned",
                   help="glibc malloc env: tuned as scripts/run_main_job.sh, glibc default, or leave as is")
    p.add_argument("--quick", action="store_true", help="< 60 s: 320 only, cache @ 256, 2 batches, 2 repeats")
    p.add_argument("--override", action="append", default=[],
                   help="an experiment override, repeatable (model.backbone.config=configs/backbones/yolov8s.yaml)")
    args = p.parse_args()
    if args.quick:
        args.img_sizes, args.teacher_input, args.batches, args.repeats, args.warmup, args.read_repeats = (
            [320],
            256,
            2,
            2,
            2,
            3,
        )
    return args


def main() -> int:
    args = parse_args()
    malloc = apply_malloc_mode(args.malloc)

    import shutil
    import tempfile

    import torch
    from _common import alternate_steps
    from torch.utils.data import DataLoader

    from vfmkd.core.config import load_experiment
    from vfmkd.datasets import collate_samples
    from vfmkd.distillation.cached import collate_distill
    from vfmkd.distillation.targets import TeacherTargets, from_cache_entry
    from vfmkd.engine.commands import prepare_features as ptf
    from vfmkd.engine.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?")
    n_images = args.batch_size * args.batches
    cache = Path(
        args.cache_dir or REPO / "work_dirs" / "bench_cache" / f"sam_vit_b_{args.teacher_input}_random_n{n_images}"
    )
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, malloc {malloc}")
    print(f"YOLOv8n, batch {args.batch_size}, {args.batches} batches of coco128/train2017 x {args.repeats} repeats per "
          f"variant (+{args.warmup} warm-up), SAM vit_b cache @ {args.teacher_input} in {cache}\n")

    from vfmkd.core.errors import CacheMismatchError

    t = time.perf_counter()
    tool_argv = ["--teacher", "sam", "--dataset", "coco128", "--splits", "train2017", "--limit", str(n_images),
                 "--batch-size", "4", "--output", str(cache), "--no-progress", "teacher.init=random",
                 f"teacher.input_size={args.teacher_input}"]
    for attempt in range(2):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # the tool's log
                rc = ptf.main(tool_argv)
            break
        except CacheMismatchError as exc:  # a cache left by an older vfmkd: rebuild it
            if attempt or args.cache_dir:
                raise
            print(f"rebuilding the benchmark cache ({str(exc).splitlines()[0]})")
            shutil.rmtree(cache)
    assert rc == 0
    print(f"cache ready in {time.perf_counter() - t:.1f} s (the tool resumes: 0 s work when already filled)\n")
    run_root = Path(tempfile.mkdtemp(prefix="vfmkd_bench_train_"))

    rows = []
    for img in args.img_sizes:
        overrides = [
            f"teachers.sam.feature_path={cache}", "teachers.sam.init=random",
            f"teachers.sam.input_size={args.teacher_input}",
            f"data.img_size={img}", f"data.batch_size={args.batch_size}", f"data.limit={n_images}",
            "data.num_workers=0",
            f"train.device={args.device}", f"work_dir={run_root}",
            "eval.fidelity=false",  # no evaluation here: no validation router, no live SAM in memory
            *args.override,
        ]
        trainers = {}
        for name in ("student-only", "offline-distill"):
            cfg = load_experiment(EXPERIMENT, overrides)
            if name == "student-only":  # no feature loss, no teacher, no cache
                cfg["distillation"]["losses"] = {k: v for k,
                                                 v in cfg["distillation"]["losses"].items() if v["type"] == "detection"}
                cfg["teachers"]["sam"]["enabled"] = False
            run_dir = run_root / f"{name}_{img}"
            (run_dir / "checkpoints").mkdir(parents=True)
            trainers[name] = Trainer(cfg, run_dir=run_dir, progress=False)  # same seed: same init
            trainers[name].model.train(), trainers[name].distiller.train()
        logging.getLogger("vfmkd").setLevel(logging.WARNING)
        distill_set = trainers["offline-distill"].train_loader.dataset  # CachedTargetsDataset: reads the HDF5 cache
        plain_set = trainers["student-only"].train_set  # the same images, no cache
        assert distill_set.caches, "the offline-distill Trainer opened no cache"
        batches = list(DataLoader(distill_set, batch_size=args.batch_size, shuffle=False, num_workers=0,
                                  collate_fn=collate_distill))  # DistillBatch: Batch + cached TeacherTargets
        grad_clip = trainers["student-only"].cfg["train"]["grad_clip"]
        for tr in trainers.values():
            assert tr.cfg["train"]["accumulate"] == 1 and tr.cfg["distillation"]["distill_interval"] == 1

        def step(name: str, item) -> float:
            """Trainer.train_one_epoch's body for one batch (accumulate=1), data already loaded:
            Trainer.train_step (batch.to(device), router.targets -- offline: the cached targets of the
            DistillBatch --, forward under autocast, distiller(...).total.backward()), then the grad clip
            over trainer.params (model + adapters), optimizer and scheduler steps."""
            tr = trainers[name]
            t0, c0 = time.perf_counter(), time.process_time()
            tr.train_step(item, 1)
            torch.nn.utils.clip_grad_norm_(tr.params, grad_clip)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            tr.scheduler.step()
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            cpu_times[name].append(time.process_time() - c0)
            return time.perf_counter() - t0

        names = list(trainers)
        cpu_times = {n: [] for n in names}  # process CPU seconds per step: a cross-check on a busy machine
        load0 = _cpu_snapshot()
        for w in range(args.warmup):
            for name in names:
                step(name, batches[w % len(batches)])
        for n in names:
            cpu_times[n].clear()  # warm-up steps out

        def report(r, times):
            print(f"  [{img}] repeat {r}: student-only {statistics.median(times['student-only'][-len(batches):]):.3f} "
                  f"s, offline-distill {statistics.median(times['offline-distill'][-len(batches):]):.3f} s", flush=True)

        times, pair_ratios = alternate_steps(step, names, batches, args.repeats, ("student-only", "offline-distill"),
                                             report)
        t_s = statistics.median(times["student-only"])
        t_d = statistics.median(times["offline-distill"])
        cpu_ratio = statistics.median(cpu_times["student-only"]) / statistics.median(cpu_times["offline-distill"])
        routes = trainers["offline-distill"].router.summary()["sam"]
        assert set(routes) == {"offline"}, f"offline-distill batches were not all read from the cache: {routes}"

        # The data path: dataset[i] + collate with vs without the HDF5 read (main process).
        reader = distill_set.caches["sam"].reader  # the OfflineTeacher's FeatureCacheReader
        image_ids = distill_set.dataset.image_ids
        load = {"with cache": [], "without cache": [], "reader.read only": []}
        idx = [list(range(k * args.batch_size, (k + 1) * args.batch_size)) for k in range(args.batches)]
        for r in range(args.read_repeats + 1):
            for b in idx:
                got = {}
                for name in (list(load) if r % 2 == 0 else list(load)[::-1]):
                    t0 = time.perf_counter()
                    if name == "with cache":
                        collate_distill([distill_set[i] for i in b])
                    elif name == "without cache":
                        collate_samples([plain_set[i] for i in b])
                    else:  # what CachedTargetsDataset reads per image, collated as collate_distill does
                        TeacherTargets.collate(
                            [from_cache_entry(reader.read(image_ids[i], dequantize=False)) for i in b]
                        )
                    got[name] = time.perf_counter() - t0
                if r:  # the first pass warms the page cache and the HDF5 handle
                    for name, v in got.items():
                        load[name].append(v)
        l_with, l_without, l_read = (statistics.median(load[n]) for n in load)
        side = args.teacher_input // 16
        print(f"\nYOLOv8n @ {img}, batch {args.batch_size}, SAM cache 256x{side}x{side} fp16 "
              f"({args.repeats * args.batches} timed steps per variant)")
        print(f"  student-only step    : {t_s * 1e3:8.1f} ms (median)")
        print(
            f"  offline-distill step : {t_d * 1e3:8.1f} ms (median); +{(t_d - t_s) * 1e3:.1f} ms for the feature loss"
        )
        print(f"  t_student_only / t_offline_distill = {t_s / t_d:.3f} (median of per-pair ratios "
              f"{statistics.median(pair_ratios):.3f}; goal >= 0.95: {'MET' if t_s / t_d >= 0.95 else 'MISSED'}); by "
              f"process CPU time {cpu_ratio:.3f}")
        print(f"  data path per batch (num_workers=0): with cache {l_with * 1e3:.1f} ms, without {l_without * 1e3:.1f} "
              f"ms -> HDF5 read adds {(l_with - l_without) * 1e3:.1f} ms/batch "
              f"({(l_with - l_without) / t_d * 100:.1f}% of a distill step); FeatureCacheReader.read "
              f"x{args.batch_size} + stack alone {l_read * 1e3:.2f} ms")
        print(f"  {idle_note(load0)}\n", flush=True)
        rows.append((img, t_s, t_d, t_s / t_d, statistics.median(pair_ratios), cpu_ratio, l_with - l_without, l_read,
                     l_with))

    print("| student input | teacher cache | student-only (ms) | offline-distill (ms) | ratio | ratio (paired median) "
          "| ratio by CPU time | HDF5 read in data path (ms/batch) | reader.read x B (ms) | whole data path with cache "
          "(ms/batch) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for img, t_s, t_d, ratio, pr, cr, extra, rd, lw in rows:
        side = args.teacher_input // 16
        print(f"| {img} | 256x{side}x{side} | {t_s * 1e3:.1f} | {t_d * 1e3:.1f} | {ratio:.3f} | {pr:.3f} | {cr:.3f} | "
              f"{extra * 1e3:.1f} | {rd * 1e3:.2f} | {lw * 1e3:.1f} |")
    shutil.rmtree(run_root, ignore_errors=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print("RESULT " + json.dumps({"rows": [{"img_size": r[0], "student_only_s": r[1], "offline_distill_s": r[2],
                                            "student_only_over_offline_distill": r[3]} for r in rows],
                                  "peak_gpu_mib": peak, "overrides": args.override}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
