#!/usr/bin/env python
"""Training throughput with 1 process and with N torchrun ranks (gloo on CPU, NCCL on CUDA).

Both runs train the same YOLOv8n student on the same coco128 images with a cached SAM teacher
(random init) and the same global batch (N ranks x B/N); each is a `tools/train.py` subprocess and
its images/s is (epochs x images) / the run's `train_seconds` (one validation at the end included,
the same in both). On a CPU, 1 process gets all threads and each rank 1/N of them.

    python benchmarks/bench_ddp_scaling.py [--ranks 2] [--epochs 3] [--images 64] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global batch (each rank gets batch / ranks)")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--teacher-size", type=int, default=128)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vfmkd_ddp_"))
    cache = work / "sam"
    env = dict(os.environ)
    subprocess.run([sys.executable, str(REPO / "tools" / "prepare_teacher_features.py"), "--teacher", "sam",
                    "--splits", "train2017", "--limit", str(a.images), "--output", str(cache), "--no-progress",
                    "teacher.init=random", f"teacher.input_size={a.teacher_size}"], check=True, env=env,
                   capture_output=True)
    cores = os.cpu_count() or 1
    results = {}
    for ranks in (1, a.ranks):
        out = work / f"runs{ranks}"
        overrides = [f"teachers.sam.feature_path={cache}", "teachers.sam.init=random",
                     f"teachers.sam.input_size={a.teacher_size}", f"data.limit={a.images}",
                     f"data.img_size={a.img_size}", f"data.batch_size={a.batch // ranks}", "data.num_workers=0",
                     f"train.epochs={a.epochs}", "eval.fidelity=false", "train.eval_interval=1000", "train.device=cpu",
                     f"work_dir={out}"]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                    if ranks > 1 else [sys.executable])
        threads = max(1, cores // ranks)
        subprocess.run([*launcher, str(REPO / "tools" / "train.py"), "--config", str(EXPERIMENT), "--no-progress",
                        *overrides], check=True, env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True)
        metrics = json.loads(next(out.glob("*/*/metrics.json")).read_text())
        results[ranks] = a.epochs * a.images / metrics["train_seconds"]
        print(f"{ranks} process(es) x {threads} thread(s), batch {a.batch // ranks} each: "
              f"{results[ranks]:.2f} images/s ({metrics['train_seconds']} s for {a.epochs} epochs)", flush=True)
    print(f"speed-up with {a.ranks} ranks: {results[a.ranks] / results[1]:.2f}x on {cores} CPU cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
