#!/usr/bin/env python
"""The agglomerative recipe (issue 20, docs/agglomerative.md) measured on random-init teachers, side by side.

    python benchmarks/bench_agglomerative.py --quick            # every part, small sizes: minutes on 2 cores
    python benchmarks/bench_agglomerative.py --part cache       # one part: cache | phi_s | multires | drop

Parts (each prints its numbers next to its baseline, measured in the same process):

* ``cache``: bytes per cached image (float16 and int8) and extraction time per image (the teacher's
  preprocessing and forward pass), per teacher (the experiment's three and SAM 3), at two teacher input sizes.
* ``phi_s``: each feature term of the untrained student over a few batches and the spread (max / min over
  teachers) of the spatial ones at the start of training, with raw maps, per-channel z-score and PHI-S
  (PHI-S's point: teachers contribute comparably), and how much each standardisation distorts a teacher's
  feature geometry (spread of distance ratios; PHI-S is one rotation and one scale: 0).
* ``multires``: held-out student-teacher cosine per teacher map (and summary token) at four student input
  sizes after a short run trained at one size vs one trained with ``data.img_sizes`` (the mode-switching
  curve: flat is the goal).
* ``drop``: epoch time of a live three-teacher run (every teacher online) with and without
  ``distillation.teacher_drop_prob`` (the dropped teachers' forward passes are skipped).

Teachers: C-RADIOv3-B, DINOv3 ViT-S/16 and SAM ViT-B of configs/experiments/yolo11s_radio_dinov3_sam_coco128.yaml
(student YOLO11s), random weights (no checkpoint here): compute and shapes are the real models', feature values are not.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import _common  # noqa: F401  (sys.path)
import torch
from _common import machine, median, quiet

import vfmkd.teachers  # noqa: F401  (registers the teachers)
from vfmkd.cache import codec
from vfmkd.cache.reader import FeatureCacheReader
from vfmkd.core.config import load_experiment
from vfmkd.core.registry import TEACHERS as TEACHERS_REGISTRY
from vfmkd.datasets.image_files import list_images, load_rgb
from vfmkd.engine.commands import prepare_features as ptf
from vfmkd.engine.training.multi_resolution import rescale_batch
from vfmkd.engine.training.trainer import Trainer

EXPERIMENT = _common.REPO / "configs" / "experiments" / "yolo11s_radio_dinov3_sam_coco128.yaml"
#: teacher -> (cached features, patch multiple of its input size)
TEACHERS = {"radio": ("patch_tokens,summary", 16), "dinov3": ("patch_tokens,cls_token", 16),
            "sam": ("image_embeddings", 16)}
#: measured by ``--part cache`` only (not in the experiment): SAM 3 (its detector FPN's stride-14 level)
CACHE_ONLY = {"sam3": ("fpn_s14", 28)}


def teacher_size(name: str, base: int) -> int:
    patch = {**TEACHERS, **CACHE_ONLY}[name][1]
    return max(patch, round(base / patch) * patch)


def cache(work: Path, name: str, size: int, images: int) -> tuple:
    """(cache folder, seconds) of the teacher's train and val caches of ``images`` images at ``size``."""
    out = work / f"{name}_{size}"
    start = time.perf_counter()
    if not (out / "train2017.h5").is_file():
        with contextlib.redirect_stdout(io.StringIO()):
            assert ptf.main(["--teacher", name, "--splits", "train2017", "val2017", "--limit", str(images),
                             "--batch-size", "4", "--output", str(out), "--no-progress", "--features",
                             TEACHERS[name][0], "teacher.init=random", f"teacher.input_size={size}"]) == 0
    return out, time.perf_counter() - start


def trainer(work: Path, caches: Dict[str, Path], sizes: Dict[str, int], a: argparse.Namespace, *extra: str) -> Trainer:
    overrides = [f"work_dir={work / 'runs'}", f"data.limit={a.images}", f"data.img_size={a.img_size}",
                 f"data.batch_size={a.batch}", "data.num_workers=0", "train.epochs=100", "data.img_sizes=[]",
                 "distillation.teacher_drop_prob=0.0", "train.log_interval=1000", "train.vis_interval=0"]
    for name, path in caches.items():
        overrides += [f"teachers.{name}.feature_path={path}", f"teachers.{name}.init=random",
                      f"teachers.{name}.input_size={sizes[name]}"]
    t = Trainer(load_experiment(EXPERIMENT, overrides + list(a.set) + list(extra)), progress=False)
    quiet()
    return t


def part_cache(a: argparse.Namespace) -> None:
    """Bytes one cached image occupies (float16 and int8, the writer's own arithmetic) and the teacher's
    extraction time per image (its preprocessing + forward on 4 coco128 images, median of 3 after a warm-up)."""
    images = [load_rgb(p) for p in list_images(_common.REPO / "datasets" / "coco128", "train2017", 4)]
    print("cache: bytes per cached image (float16 | int8) and extraction time per image, per teacher input size")
    for name, (features, _) in {**TEACHERS, **CACHE_ONLY}.items():
        row = []
        for base in (a.teacher_size, 2 * a.teacher_size):
            size = teacher_size(name, base)
            with contextlib.redirect_stderr(io.StringIO()):
                teacher = TEACHERS_REGISTRY.build(name, init="random", input_size=size, device="cpu")
            quiet()
            specs = [s for s in teacher.feature_specs() if s.name in features.split(",")]
            nbytes = {st: sum(codec.bytes_per_image(specs, size, st, False)) for st in ("float16", "int8")}
            times = []
            for _ in range(4):
                start = time.perf_counter()
                with torch.no_grad():
                    teacher.extract_features(images)
                times.append((time.perf_counter() - start) / len(images))
            row.append(f"@{size}: {nbytes['float16']:>9,d} | {nbytes['int8']:>9,d} B, {median(times[1:]):6.3f} s/image")
        print(f"  {name:7s} " + "   ".join(row), flush=True)


@torch.no_grad()
def start_losses(t: Trainer, batches: int) -> Dict[str, float]:
    """Mean of each feature term (``loss_feat_distill_*``) of the untrained student over ``batches`` batches."""
    t.model.train()
    sums: Dict[str, List[float]] = {}
    for step, item in enumerate(t.train_loader):
        if step == batches:
            break
        batch = item.batch.to(t.device)
        targets = t.router.targets(step, batch, item.cached, list(t.distiller.teachers_used()))
        for k, v in t.distiller(t.model(batch.images), batch, targets).logs.items():
            if k.startswith("loss_feat_distill_"):
                sums.setdefault(k[len("loss_feat_distill_"):], []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def distortion(reader: FeatureCacheReader, name: str, mode: str) -> float:
    """Relative spread of ||y_i - y_j|| / ||x_i - x_j|| over cached vectors (0: the geometry is kept)."""
    x = torch.cat([reader.read(i)["features"][name].float().flatten(1).T for i in reader.image_ids[:4]])
    if mode == "phi_s":
        phi = reader.phi_s(name)
        y = phi.apply(x.T[None, :, :, None])[0, :, :, 0].T
    elif mode == "true":
        mean, std = reader.stats(name)
        y = (x - mean) / std
    else:
        return 0.0
    dx, dy = torch.pdist(x[:300].double()), torch.pdist(y[:300].double())
    keep = dx > 1e-6 * dx.max()  # identical vectors (a teacher's padded cells) have no ratio
    ratio = dy[keep] / dx[keep]
    return float(ratio.std() / ratio.mean())


def part_phi_s(work: Path, caches, sizes, a: argparse.Namespace) -> None:
    print("phi_s: each feature term of the untrained student (3 batches), spread = max / min over the spatial "
          "terms; geometry distortion of each teacher's primary map (0 = distances kept up to one scale)")
    readers = {n: FeatureCacheReader(p / "train2017.h5") for n, p in caches.items()}
    for mode in ("false", "true", "phi_s"):
        losses = start_losses(trainer(work, caches, sizes, a, f"distillation.standardize={mode}"), 3)
        spatial = [v for k, v in losses.items() if not k.endswith("_summary")]
        spread = max(spatial) / max(min(spatial), 1e-12)
        warp = {n: distortion(r, TEACHERS[n][0].split(",")[0], mode) for n, r in readers.items()}
        label = {"false": "raw", "true": "z-score", "phi_s": "PHI-S"}[mode]
        print(f"  {label:8s} " + "  ".join(f"{k} {v:8.4g}" for k, v in sorted(losses.items()))
              + f"   spatial spread {spread:6.2f}x   distortion " + " ".join(f"{n} {w:.3f}" for n, w in warp.items()))


@torch.no_grad()
def held_out_cosine(t: Trainer, size: int) -> Dict[str, float]:
    """Per feature term (a teacher map or summary token): the cosine between adapted student and teacher over the
    held-out images' valid cells, with
    the student at ``size`` (the same view rescaled: the teacher targets come through the geometry)."""
    t.model.eval()
    t.distiller.eval()
    sums: Dict[str, List[float]] = {}
    for step, item in enumerate(t.val_loader):
        batch = rescale_batch(item.batch, size).to(t.device)
        targets = t.val_router.targets(step, batch, item.cached, list(t.distiller.teachers_used(False)))
        for name, (cos, _, cells) in t.distiller.agreement(t.model(batch.images), batch, targets).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + cos, acc[1] + cells
    return {k: v[0] / max(v[1], 1.0) for k, v in sums.items()}


def part_multires(work: Path, caches, sizes, a: argparse.Namespace) -> None:
    eval_sizes = a.eval_sizes
    print(f"multires: held-out cosine per teacher at student sizes {eval_sizes} after {a.epochs} epochs "
          f"({a.images} images); single size {a.img_size} vs data.img_sizes={eval_sizes}")
    for label, extra in (("single", []), ("multi", [f"data.img_sizes=[{','.join(map(str, eval_sizes))}]"])):
        t = trainer(work, caches, sizes, a, f"data.img_size={max(eval_sizes)}", *extra) if extra else \
            trainer(work, caches, sizes, a)
        for epoch in range(1, a.epochs + 1):
            t.train_one_epoch(epoch)
        curves = {s: held_out_cosine(t, s) for s in eval_sizes}
        for term in sorted(curves[eval_sizes[0]]):
            row = [curves[s][term] for s in eval_sizes]
            print(f"  {label:6s} {term:15s} " + "  ".join(f"@{s}: {c:6.3f}" for s, c in zip(eval_sizes, row))
                  + f"   max - min {max(row) - min(row):.3f}")


def part_drop(work: Path, caches, sizes, a: argparse.Namespace) -> None:
    print(f"drop: epoch time of a live three-teacher run ({a.images} images, batch {a.batch}), median of "
          f"{a.repeats} epochs per setting, alternating")
    live = [f"teachers.{n}.offline=false" for n in TEACHERS]
    runs = {p: trainer(work, caches, sizes, a, *live, f"distillation.teacher_drop_prob={p}", "eval.fidelity=false")
            for p in (0.0, 0.5)}
    for t in runs.values():
        t.train_one_epoch(0)  # warm-up
    times: Dict[float, List[float]] = {p: [] for p in runs}
    for r in range(a.repeats):
        for p in sorted(runs, reverse=bool(r % 2)):
            start = time.perf_counter()
            runs[p].train_one_epoch(r + 1)
            times[p].append(time.perf_counter() - start)
    t = runs[0.5]
    drops = t.teacher_drop.counts(range(t.step), t.distiller.teachers_used())
    base = median(times[0.0])
    for p in sorted(runs):
        print(f"  teacher_drop_prob {p:.1f}: {median(times[p]):7.2f} s/epoch  ({median(times[p]) / base:.2f}x)")
    print(f"  drops counted (p=0.5, every epoch incl. warm-up): {drops}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "cache", "phi_s", "multires", "drop"], default="all")
    p.add_argument("--teacher-size", type=int, default=224, help="the smaller teacher input size (x2: the larger)")
    p.add_argument("--img-size", type=int, default=320, help="the single-size run's student input size")
    p.add_argument("--eval-sizes", type=int, nargs=4, default=[256, 320, 416, 512])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="experiment overrides for every run, e.g. train.lr=0.005")
    p.add_argument("--work", type=Path, default=None, help="keep caches here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="teachers @112/224, student 128-256, 8 images, 2 epochs")
    a = p.parse_args()
    if a.quick:
        a.teacher_size, a.img_size, a.eval_sizes, a.images, a.epochs, a.repeats = 112, 160, [128, 160, 192, 256], 8, \
            2, 2
    torch.set_num_threads(2)
    quiet()
    work = a.work or Path(tempfile.mkdtemp(prefix="vfmkd_agglo_"))
    print(f"machine: {machine()}")
    if a.part in ("all", "cache"):
        part_cache(a)
        if a.part == "cache":
            return
    sizes = {n: teacher_size(n, a.teacher_size) for n in TEACHERS}
    caches = {n: cache(work, n, sizes[n], a.images)[0] for n in TEACHERS}
    if a.part in ("all", "phi_s"):
        part_phi_s(work, caches, sizes, a)
    if a.part in ("all", "multires"):
        part_multires(work, caches, sizes, a)
    if a.part in ("all", "drop"):
        part_drop(work, caches, sizes, a)
    print("(random teachers; CPU shared while measured: read the ratios side by side, absolute times are noisy)")


if __name__ == "__main__":
    main()
