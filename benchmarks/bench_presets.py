#!/usr/bin/env python
"""Peak memory and step time of each memory preset (configs/presets) on the main experiment.

    python benchmarks/bench_presets.py                 # 32 images: 2 optimizer steps of the file's batch 16
    python benchmarks/bench_presets.py --images 16     # one step per preset (CPU: a few minutes in all)

Each preset runs in its own subprocess (peak memory is per process): configs/experiments/yolov8_sam_coco128.yaml
as written except that the SAM teacher runs live on every batch at its file size (``offline: false``,
random init: the real ViT-B compute), then the preset applied exactly as ``tools/train.py --preset NAME``
does (vfmkd/utils/cli.py apply_preset), one timed epoch of ``--images`` images. Reported: seconds per
optimizer step (the file's 16 images), the process's max RSS, and on CUDA ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import _common  # noqa: F401  (sys.path)

PRESETS = ["gpu_24g_plus", "gpu_16g", "gpu_8g", "cpu"]


def child(a) -> None:
    import torch
    from _common import REPO, quiet

    from vfmkd.core.config import read_yaml
    from vfmkd.engine.training.trainer import Trainer
    from vfmkd.utils.cli import apply_preset

    torch.set_num_threads(a.threads)
    raw = read_yaml(REPO / "configs/experiments/yolov8_sam_coco128.yaml")
    # the bench's own edits go into the file layer (under the preset); the preset then moves its levers
    raw["teachers"]["sam"].update(offline=False, init="random")
    raw["data"].update(limit=a.images, img_size=a.img_size, num_workers=0)
    raw.update(work_dir=tempfile.mkdtemp())
    raw["eval"] = {"fidelity": False}
    raw["train"].update(eval_interval=1000, vis_interval=0, epochs=1)
    cfg = apply_preset(raw, [], "yolov8_sam_coco128.yaml", None if a.child == "none" else a.child)
    trainer = Trainer(cfg, progress=False)
    quiet()
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train_one_epoch(0)
    if cuda:
        torch.cuda.synchronize()
    steps = max(1, len(trainer.train_loader) // cfg["train"]["accumulate"])
    out = {"step_s": (time.perf_counter() - start) / steps,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "batch": cfg["data"]["batch_size"], "accumulate": cfg["train"]["accumulate"],
           "teacher_size": cfg["teachers"]["sam"]["input_size"], "interval": cfg["distillation"]["distill_interval"]}
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def run_child(name: str, a) -> dict:
    from _common import run_result_child

    return run_result_child(__file__, ["--child", name, "--images", str(a.images), "--img-size", str(a.img_size),
                                       "--threads", str(a.threads)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--presets", nargs="*", default=PRESETS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    from _common import machine
    print(f"machine: {machine()}")
    print(f"main experiment, SAM ViT-B live (random init), YOLOv8n @ {a.img_size}, {a.images} images, one epoch")
    print("| preset | micro-batch x accumulate | teacher input | distill_interval | s / optimizer step | vs "
          "gpu_24g_plus | peak RSS MiB | CUDA peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for name in a.presets:
        r = run_child(name, a)
        base = base or r["step_s"]
        print(f"| {name} | {r['batch']} x {r['accumulate']} | {r['teacher_size']} | {r['interval']} | "
              f"{r['step_s']:.1f} | {r['step_s'] / base:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r.get('cuda_peak_mb', float('nan')):.0f} |", flush=True)


if __name__ == "__main__":
    main()
