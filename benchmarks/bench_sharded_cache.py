#!/usr/bin/env python
"""Sharded feature caching (torchrun, gloo on CPU) vs one process: end-to-end images/s of the cache tool.

    python benchmarks/bench_sharded_cache.py                  # SAM vit_b random-init @ 256, 32 coco128 images, batch 4
    python benchmarks/bench_sharded_cache.py --images 64 --input-size 512 --ranks 2

Each variant runs ``tools/prepare_teacher_features.py`` as a fresh command into a fresh folder and is timed
wall-clock from launch to exit (Python + torch import, teacher build, image probing, teacher forwards, HDF5
writes and, for the sharded run, the barrier and rank 0's merge of the shards):

* single: one process with ``--threads-single`` torch threads (default: all cores, 2 here);
* sharded: ``python -m torch.distributed.run --standalone --nproc_per_node R``, each rank 1 thread
  (OMP_NUM_THREADS=1), caching its shard, then the merge.

The same cores either way: the comparison is data parallelism across processes vs intra-op threads in one.
Both outputs are checked to be complete caches of the same image list (their values differ in the last
fp16 bit, since the thread counts differ; equal thread counts give bit-identical files: tests/test_sharded_cache.py).
The glibc malloc thresholds are set as scripts/run_main_job.sh does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads), "YOLO_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads-single", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    tool = str(REPO / "tools" / "prepare_teacher_features.py")
    common = ["--teacher", "sam", "--splits", "train2017", "--limit", str(a.images), "--batch-size", str(a.batch_size),
              "--no-progress", "teacher.init=random", f"teacher.input_size={a.input_size}"]
    times = {"single": [], "sharded": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for name in times:  # alternate the variants
                out = Path(tmp) / f"{name}{r}"
                if name == "single":
                    cmd, threads = [sys.executable, tool, *common, "--output", str(out)], a.threads_single
                else:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(a.ranks),
                           tool, *common, "--output", str(out)]
                    threads = 1
                times[name].append(run(cmd, threads))
                with h5py.File(out / "train2017.h5", "r") as f:
                    assert f["done"][:].all() and len(f["done"]) == a.images
                assert sorted(x.name for x in out.iterdir()) == ["train2017.h5"]
    print(f"SAM vit_b random-init @ {a.input_size}, {a.images} coco128 images, batch {a.batch_size}, "
          f"{os.cpu_count()} CPU cores; wall time per command (launch to exit), median of {a.repeats}")
    single, sharded = (statistics.median(times[k]) for k in ("single", "sharded"))
    print(f"  single process, {a.threads_single} torch threads : {single:6.1f} s  {a.images / single:6.2f} images/s")
    print(f"  torchrun {a.ranks} ranks (gloo), 1 thread each  : {sharded:6.1f} s  {a.images / sharded:6.2f} images/s"
          f"  ({single / sharded:.2f}x)")


if __name__ == "__main__":
    main()
