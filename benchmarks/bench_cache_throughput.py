#!/usr/bin/env python
"""Feature-cache throughput: the real cache tool's pipeline vs the bare teacher forward.

    python benchmarks/bench_cache_throughput.py            # vit_b @ 512, batch 4, 16 coco128 images
    python benchmarks/bench_cache_throughput.py --full     # + vit_b @ 1024
    python benchmarks/bench_cache_throughput.py --quick    # < 60 s smoke run (input 256, 8 images)

Measured in ONE process, alternating the two variants on the same images and batch size:

* pipeline: the cache tool's own ``fill_split`` (vfmkd/engine/commands/prepare_features.py: list + probe
  images, JPEG decode, SAM preprocess, ``teacher.extract_features``, fp16 HDF5 write through
  ``FeatureCacheWriter``) into a fresh output folder each repeat; the teacher is built once outside the
  timing (the tool builds it once per run too; its build time is printed separately).
* bare: ``teacher.forward_features(pixels)`` on batches that were already preprocessed.

Ratio = pipeline images/s / bare images/s (goal >= 0.85 on CPU). Medians over ``--repeats`` after a
warm-up forward. SAM is built with ``teacher.init=random`` (no weights here): the features are
meaningless but the compute is the real model's.

SAM's large activations make glibc return memory to the OS after every block; by default this script
re-executes itself with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` = 16 GiB as
``scripts/run_main_job.sh`` does (``--malloc default`` measures glibc's defaults, ``--malloc inherit``
leaves the environment alone).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def apply_malloc_mode(mode: str) -> str:
    """Re-exec with the wanted glibc malloc environment (it is read at process start only)."""
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
    p.add_argument("--variant", default="vit_b", help="SAM variant (teacher.variant)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512], help="teacher input sizes")
    p.add_argument("--full", action="store_true", help="also 1024 (SAM's native size)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--images", type=int, default=16, help="first N images of the split")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median reported)")
    p.add_argument("--split", default="train2017")
    p.add_argument("--device", default="cpu", help="teacher device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--malloc", choices=("tuned", "default", "inherit"), default="tuned",
                   help="glibc malloc env: tuned as scripts/run_main_job.sh, glibc default, or leave as is")
    p.add_argument("--workdir", default=None, help="where the temporary cache files go (default: a temp dir)")
    p.add_argument("--layout-sizes", type=int, nargs="*", default=[1024, 512, 384],
                   help="input sizes of the bytes-per-image table (real FeatureCacheWriter files, nothing computed)")
    p.add_argument("--layout-images", type=int, default=128, help="images per file of the bytes-per-image table")
    p.add_argument("--quick", action="store_true", help="< 60 s: input 256, 8 images, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.images, args.repeats, args.full = [256], 8, 2, False
    if args.full and 1024 not in args.sizes:
        args.sizes = list(args.sizes) + [1024]
    return args


def main() -> int:
    args = parse_args()
    malloc = apply_malloc_mode(args.malloc)

    import numpy as np
    import torch

    from vfmkd.cache.fill import selected_specs
    from vfmkd.cache.writer import FeatureCacheWriter
    from vfmkd.core.config import resolve_path
    from vfmkd.core.registry import TEACHERS
    from vfmkd.datasets.image_files import list_images, load_rgb
    from vfmkd.engine.commands import prepare_features as ptf

    torch.set_num_threads(args.threads)
    logging.getLogger("vfmkd").setLevel(logging.ERROR)  # the random-init banner, once per teacher
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, malloc {malloc}")
    print(f"SAM {args.variant} (teacher.init=random), batch {args.batch_size}, {args.images} images of "
          f"coco128/{args.split}, {args.repeats} repeats, variants alternated\n")

    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    root = resolve_path("datasets/coco128")
    paths = list_images(root, args.split, args.images)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vfmkd_bench_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in args.sizes:
            def tool_args(out: Path) -> argparse.Namespace:
                return ptf.build_parser().parse_args([
                    "--teacher", "sam", "--dataset", "coco128", "--splits", args.split, "--limit", str(args.images),
                    "--batch-size", str(args.batch_size), "--output", str(out), "--no-progress",
                    f"teacher.variant={args.variant}", f"teacher.input_size={size}", "teacher.init=random",
                    f"teacher.device={args.device}",
                ])

            targs = tool_args(work / "unused")
            entry, kwargs = ptf.resolve_teacher(targs)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            teacher = TEACHERS.build(entry["type"], where="teacher 'sam'", **kwargs)
            build_s = time.perf_counter() - t0
            chunks = [paths[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
            pixels = [teacher.preprocess([load_rgb(p) for p in c]).pixels.to(teacher.device) for c in chunks]

            cpu = {"bare": [], "pipeline": []}  # process CPU seconds: a cross-check when the machine is not idle

            def bare() -> float:
                sync()
                t, c = time.perf_counter(), time.process_time()
                for px in pixels:
                    teacher.forward_features(px)
                sync()
                cpu["bare"].append(time.process_time() - c)
                return time.perf_counter() - t

            last_file = {}

            def pipeline(r: int) -> float:
                out = work / f"s{size}_r{r}"
                shutil.rmtree(out, ignore_errors=True)
                a = tool_args(out)
                sync()
                t, c = time.perf_counter(), time.process_time()
                with contextlib.redirect_stdout(io.StringIO()):  # the tool's summary line
                    out_file, cached = ptf.fill_split(a, teacher, entry, root, args.split, out)
                sync()
                dt = time.perf_counter() - t
                cpu["pipeline"].append(time.process_time() - c)
                assert len(cached) == len(paths)
                last_file["size"] = out_file.stat().st_size
                shutil.rmtree(out, ignore_errors=True)
                return dt

            teacher.forward_features(pixels[0])  # warm-up (allocator, oneDNN kernels)
            load0 = _cpu_snapshot()
            t_bare, t_pipe = [], []
            for r in range(args.repeats):
                if r % 2 == 0:
                    t_bare.append(bare())
                    t_pipe.append(pipeline(r))
                else:
                    t_pipe.append(pipeline(r))
                    t_bare.append(bare())
                print(f"  [{size}] repeat {r}: bare {t_bare[-1]:.2f} s (CPU {cpu['bare'][-1]:.1f} s), "
                      f"pipeline {t_pipe[-1]:.2f} s (CPU {cpu['pipeline'][-1]:.1f} s)", flush=True)
            note = idle_note(load0)
            n = len(paths)
            ips_bare = n / statistics.median(t_bare)
            ips_pipe = n / statistics.median(t_pipe)
            ratios = [b / p for b, p in zip(t_bare, t_pipe)]
            cpu_ratio = statistics.median(cpu["bare"]) / statistics.median(cpu["pipeline"])

            # Where the pipeline's extra time goes (the non-forward steps, timed on their own).
            t = time.perf_counter()
            imgs = [load_rgb(p) for p in paths]
            decode_ms = (time.perf_counter() - t) / n * 1e3
            t = time.perf_counter()
            for c in range(0, n, args.batch_size):
                teacher.preprocess(imgs[c:c + args.batch_size])
            prep_ms = (time.perf_counter() - t) / n * 1e3
            specs = selected_specs(teacher, None)
            feats = teacher.forward_features(pixels[0])
            geo = teacher.preprocess(imgs[:args.batch_size])
            wfile = work / f"write_{size}.h5"
            with FeatureCacheWriter(wfile, [p.stem for p in paths], teacher.fingerprint(), specs, size,
                                    teacher_config=entry, dataset="coco128", split=args.split,
                                    batch_size=args.batch_size) as w:
                t = time.perf_counter()
                for c in range(0, n - args.batch_size + 1, args.batch_size):
                    w.write(c, feats, geo.affine, geo.valid_hw,
                            np.array([im.shape[:2] for im in imgs[:args.batch_size]]))
                write_ms = (time.perf_counter() - t) / (n // args.batch_size * args.batch_size) * 1e3
            wfile.unlink()

            theory = sum(s.channels * (size // s.stride) ** 2 * 2 for s in specs)
            per_img_file = last_file["size"] / n
            print(f"\nSAM {args.variant} @ {size} (teacher build {build_s:.1f} s, not in the timings)")
            print(f"  bare forward_features : {ips_bare:7.3f} images/s  (median {statistics.median(t_bare):.2f} s / "
                  f"{n} images)")
            print(f"  cache tool pipeline   : {ips_pipe:7.3f} images/s  (median {statistics.median(t_pipe):.2f} s / "
                  f"{n} images)")
            print(f"  ratio pipeline/bare   : {ips_pipe / ips_bare:.3f}  (per-repeat "
                  f"{', '.join(f'{x:.3f}' for x in ratios)}; goal >= 0.85: "
                  f"{'MET' if ips_pipe / ips_bare >= 0.85 else 'MISSED'}); by process CPU time {cpu_ratio:.3f}")
            print(f"  non-forward steps     : decode {decode_ms:.1f} ms/img, SAM preprocess {prep_ms:.1f} ms/img, "
                  f"fp16 HDF5 write {write_ms:.2f} ms/img (forward {1e3 / ips_bare:.0f} ms/img)")
            held = " + ".join(f"{s.name} {s.channels}x{size // s.stride}x{size // s.stride}" for s in specs)
            print(f"  bytes per cached image: file {per_img_file:,.0f} B/image ({last_file['size']:,} B / {n}); "
                  f"theoretical C*h*w*2 = {theory:,} B ({held} fp16)")
            print(f"  {note}\n", flush=True)
            rows.append((size, ips_bare, ips_pipe, ips_pipe / ips_bare, cpu_ratio, decode_ms + prep_ms, write_ms,
                         per_img_file, theory))
            teacher = pixels = None  # free the model before the next size
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("| input | bare forward (img/s) | cache pipeline (img/s) | ratio | ratio by CPU time | decode+preprocess "
          "(ms/img) | write (ms/img) | file B/image | C*h*w*2 B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, b, p, r, cr, dp, w, fb, th in rows:
        print(f"| {size} | {b:.3f} | {p:.3f} | {r:.3f} | {cr:.3f} | {dp:.1f} | {w:.2f} | {fb:,.0f} | {th:,} |")
    if args.layout_sizes:
        layout_table(args)
    return 0


def layout_table(args: argparse.Namespace) -> None:
    """Bytes per cached image of SAM at several input sizes, default features vs --features all: a real
    FeatureCacheWriter file (preallocated, as the tool writes it) for N images, size / N."""
    from vfmkd.cache.writer import FeatureCacheWriter
    from vfmkd.core.feature_spec import FeatureSpec
    from vfmkd.teachers.sam_teacher import SAM_VARIANTS, SamTeacher

    dim = SAM_VARIANTS[args.variant][0]
    all_specs = (FeatureSpec("trunk", dim, 16), FeatureSpec("image_embeddings", 256, 16))  # SamTeacher.feature_specs()
    n = args.layout_images
    ids = [f"{i:012d}" for i in range(n)]
    print(f"\nBytes per cached image, SAM {args.variant}, fp16 storage (real FeatureCacheWriter files of {n} images):")
    print("| input | --features | maps | C*h*w*2 per image (B) | file / images (B) | MiB / image |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="vfmkd_layout_") as tmp:
        for size in args.layout_sizes:
            fp = SamTeacher.config_fingerprint(variant=args.variant, init="random", input_size=size)
            for label, specs in (("default (image_embeddings)", all_specs[1:]), ("all", all_specs)):
                path = Path(tmp) / f"{size}_{len(specs)}.h5"
                FeatureCacheWriter(path, ids, fp, specs, size, teacher_config={"type": "sam"}, dataset="coco128",
                                   split="train2017", batch_size=4).close()
                theory = sum(s.channels * (size // s.stride) ** 2 * 2 for s in specs)
                maps = " + ".join(f"{s.channels}x{size // 16}x{size // 16}" for s in specs)
                per = path.stat().st_size / n
                print(f"| {size} | {label} | {maps} | {theory:,} | {per:,.0f} | {per / 2**20:.3f} |")
                path.unlink()


if __name__ == "__main__":
    sys.exit(main())
