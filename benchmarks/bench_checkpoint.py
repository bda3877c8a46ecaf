#!/usr/bin/env python
"""Checkpoint save time and size: vfmkd's atomic, NaN-checked ``save_checkpoint`` (temp file,
fsync, rename, previous kept) vs a plain in-place ``torch.save`` of the same training state.

The state is what ``Trainer.save`` writes for a YOLOv8n student with a SAM feature adapter after one
AdamW step (model, adapters, optimizer moments, scheduler, RNG states, history).

    python benchmarks/bench_checkpoint.py [--variant n] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vfmkd.core.feature_spec import FeatureSpec  # noqa: E402
from vfmkd.distillation.distiller import Distiller  # noqa: E402
from vfmkd.engine.builders import build_loss_terms, build_model  # noqa: E402
from vfmkd.engine.training.resume import capture_rng  # noqa: E402
from vfmkd.utils.checkpoint import save_checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="n")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    model = build_model({"backbone": {"type": "yolov8", "variant": a.variant},
                         "neck": {"type": "yolov8_pafpn", "depth": 1},
                         "heads": {"detection": {"type": "yolo_head", "num_classes": 80}}})
    terms = build_loss_terms({"feature_mse": {"type": "feature_mse", "teacher": "sam"}}, model,
                             {"sam": (FeatureSpec("image_embeddings", 256, 16),)}, {"sam": "image_embeddings"})
    distiller = Distiller(terms)
    params = list(model.parameters()) + list(distiller.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"model": model.state_dict(), "distiller": distiller.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "epoch": 1, "config": {}, "metrics": {},
             "resume": {"rng": capture_rng(), "history": []}}
    folder = Path(tempfile.mkdtemp(prefix="vfmkd_ckpt_"))
    times = {"torch.save in place": [], "save_checkpoint (atomic)": []}
    for r in range(a.repeats + 1):
        for name in (list(times) if r % 2 == 0 else list(times)[::-1]):
            t0 = time.perf_counter()
            if name.startswith("torch"):
                torch.save(state, folder / "plain.pt")
            else:
                save_checkpoint(folder / "last.pt", state, keep_previous=True)
            if r:  # the first round warms the page cache
                times[name].append(time.perf_counter() - t0)
    size = (folder / "last.pt").stat().st_size
    n_params = sum(p.numel() for p in params)
    print(f"YOLOv8{a.variant} + adapter: {n_params / 1e6:.2f} M parameters; checkpoint {size / 2**20:.1f} MiB "
          f"(weights, AdamW moments, RNG states)")
    for name, values in times.items():
        print(f"  {name:28s} median {statistics.median(values) * 1e3:7.1f} ms over {len(values)} saves")
    ratio = statistics.median(times["save_checkpoint (atomic)"]) / statistics.median(times["torch.save in place"])
    print(f"  atomic / in place = {ratio:.2f} (fsync and the NaN scan are the difference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
