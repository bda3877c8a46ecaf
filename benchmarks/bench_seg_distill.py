#!/usr/bin/env python
"""Segmentation and output distillation (issue 8): mask-logit cache bytes, SAM mask-decoder cost, the
mask-distill train step, and each segmentation head with vs without distillation after a short budget.

    python benchmarks/bench_seg_distill.py            # aimed at ~20 min on 2 idle CPU cores (not timed whole)
    python benchmarks/bench_seg_distill.py --quick    # fewer images, epochs, repeats: 40 min on the 2 cores
                                                      # shared with ~1.5 cores of other jobs (BENCHMARKS.md)
    python benchmarks/bench_seg_distill.py --only bytes decoder step heads   # any subset

Every teacher has RANDOM weights (``teacher.init=random``; no weights can be downloaded here): shapes,
bytes and compute are the real models', the teachers' masks are meaningless, so part 4 says what
distilling a *random* teacher does after a short budget -- rerun it with real weights
(``--teacher-init pretrained``, weights under weights/) before drawing conclusions about accuracy.

1. bytes: ``tools/prepare_teacher_features.py --teacher sam --outputs features,masks`` on the first N
   coco128 train2017 images at SAM input 1024 (256x256 logits per box) and 512 (128x128), with
   ``--storage float16`` and ``--storage int8``; per image the bytes the HDF5 mask datasets really
   occupy (``get_storage_size`` of every dataset under masks/ divided over its rows, times the
   image's rows, + its offsets/masks_done entries), mean and max, and boxes per image. Also the
   int8 logits' error against fp16 (same random teacher, same boxes) and the agreement of the
   binarised masks (logit > 0).
2. decoder: ``SamTeacher.forward_features`` for one image vs ``SamTeacher.mask_logits`` for K random
   boxes of that image (K = 1, 8, 32), interleaved, medians: ms per box and its ratio to the encoder.
3. step: two ``Trainer``s of configs/experiments/yolov8n_seg_sam_coco128.yaml (YOLOv8n + yolo_seg_head,
   img 320, batch 8) on the same batches of a cached SAM (features + masks) read through
   ``CachedTargetsDataset``: task-only (instance_segmentation + detection, teacher disabled) vs
   mask-distill (+ mask_distill from the cached mask logits + feature_mse on P4), alternating step by
   step after warm-up (who goes first flips), the body of ``Trainer.train_one_epoch`` per step.
   Goal: t_task_only / t_mask_distill >= 0.9.
4. heads: ``Trainer.fit`` of the three segmentation experiments (instance: yolov8n_seg_sam_coco128,
   semantic: regnet_semantic_sam_coco128, binary person: lora_sam_binary_person_coco128) with their
   distillation terms vs the same config with only the task losses (teacher disabled), same seed,
   same short budget (first N train2017 images, first N val2017 images, E epochs, LR warm-up over 4
   steps); the teachers are read from caches (features + masks) written first by the tool. Reports
   mask mAP50-95 (and mAP50), mIoU, Dice on val2017 after the last epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate_steps  # noqa: E402
from bench_train_step import _cpu_snapshot, apply_malloc_mode, idle_note  # noqa: E402

EXPERIMENTS = REPO / "configs" / "experiments"
TASK_LOSSES = {"detection", "instance_segmentation", "semantic_segmentation", "binary_segmentation"}
LORA_RANK = ["teacher.lora_rank=4", "teacher.lora_alpha=4.0"]  # the experiment's LoRA


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", nargs="+", choices=("bytes", "decoder", "step", "heads"),
                   default=["bytes", "decoder", "step", "heads"])
    p.add_argument("--bytes-images", type=int, nargs=2, default=[32, 8], metavar=("N512", "N1024"),
                   help="images cached for the byte count at SAM input 512 and 1024")
    p.add_argument("--decoder-sizes", type=int, nargs="+", default=[1024, 512])
    p.add_argument("--decoder-boxes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--decoder-repeats", type=int, default=3)
    p.add_argument("--step-batches", type=int, default=4, help="distinct batches of 8 (cache @ 512 of part 1)")
    p.add_argument("--step-repeats", type=int, default=4)
    p.add_argument("--step-warmup", type=int, default=2)
    p.add_argument("--heads-images", type=int, default=64, help="train and val images of part 4")
    p.add_argument("--heads-epochs", type=int, default=4)
    p.add_argument(
        "--heads-img", type=int, default=None, help="student input of every head (default: instance 320, others 256)"
    )
    p.add_argument("--heads-teacher-input", type=int, default=256, help="SAM / LoRA-SAM input of part 4's caches")
    p.add_argument("--teacher-init", default="random", help="random, or pretrained (weights under weights/)")
    p.add_argument("--lora-checkpoint", default="null", help="LoRA matrices of the binary experiment's teacher "
                                                               "(null only with --teacher-init random)")
    p.add_argument("--device", default="cpu", help="train.device of parts 3 and 4 (cpu, cuda)")
    p.add_argument("--cache-root", default=str(REPO / "work_dirs" / "bench_cache"), help=
                   "caches are reused when present")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=("tuned", "default", "inherit"), default="tuned")
    p.add_argument("--quick", action="store_true", help="8/1 images for bytes, 512 only for the decoder, "
                                                        "2x2 steps, 16 images x 2 epochs per head")
    args = p.parse_args()
    if args.quick:
        args.bytes_images, args.decoder_sizes, args.decoder_repeats = [8, 1], [512], 2
        args.step_batches, args.step_repeats, args.step_warmup = 1, 3, 1
        args.heads_images, args.heads_epochs = 16, 2
    return args


def run_tool(argv, out: Path) -> Path:
    """The cache tool, quietly; a cache left by an older vfmkd (CacheMismatchError) is rebuilt."""
    from vfmkd.core.errors import CacheMismatchError
    from vfmkd.engine.commands import prepare_features as ptf

    for attempt in range(2):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = ptf.main(argv + ["--output", str(out), "--no-progress"])
            assert rc == 0, f"prepare_teacher_features {' '.join(argv)} returned {rc}"
            return out
        except CacheMismatchError as exc:
            if attempt:
                raise
            print(f"  rebuilding {out} ({str(exc).splitlines()[0]})")
            shutil.rmtree(out, ignore_errors=True)
    return out


def sam_cache(args, size: int, n: int, storage: str = "float16", split: str = "train2017",
              teacher: str = "sam") -> Path:
    out = Path(args.cache_root) / f"{teacher}_{size}_{args.teacher_init}_masks_{storage}_n{n}"
    extra = LORA_RANK + [f"teacher.lora_checkpoint={args.lora_checkpoint}"] if teacher == "lora_sam" else []
    t = time.perf_counter()
    run_tool(["--teacher", teacher, "--splits", split, "--limit", str(n), "--batch-size", "4", "--outputs",
              "features,masks",
              "--storage", storage, f"teacher.init={args.teacher_init}", f"teacher.input_size={size}", *extra], out)
    print(f"  cache {out.name}/{split}.h5 ready ({time.perf_counter() - t:.0f} s; reused when already filled)",
          flush=True)
    return out


# ---------------------------------------------------------------------------------------------- 1. bytes
def mask_bytes_per_image(path: Path):
    """Per image: (mask bytes, boxes), the bytes the mask datasets of the HDF5 file occupy."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        offsets = f["masks/offsets"][:]
        m, n = int(offsets[-1]), len(offsets) - 1
        per_row, per_image = 0.0, 0.0
        datasets = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name.split("/")[0].startswith("masks"):
                datasets[name] = obj.id.get_storage_size()
        f.visititems(visit)
        for name, size in datasets.items():
            shape = f[name].shape
            if name in ("masks/offsets", "masks_done"):  # one entry per image (+1)
                per_image += size / n
            else:
                assert shape[0] == m, (name, shape)
                per_row += size / m
        boxes = np.diff(offsets)
        total = boxes * per_row + per_image
        logits = f["masks/logits"]
        info = {"side": logits.shape[-1], "dtype": str(logits.dtype), "per_row": per_row, "per_image_fixed": per_image,
                "file_bytes": path.stat().st_size, "images": n, "datasets": datasets}
    return total, boxes, info


def decoded_logits(path: Path):
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        x = f["masks/logits"][:].astype(np.float32)
        if "masks/scale" in f:
            x *= f["masks/scale"][:][:, None, None]
    return x


def part_bytes(args, results) -> None:
    import numpy as np

    print("\n== 1. bytes per cached image of SAM mask logits (coco128 train2017) ==", flush=True)
    rows = []
    for size, n in zip((512, 1024), args.bytes_images):
        files = {}
        for storage in ("float16", "int8"):
            files[storage] = sam_cache(args, size, n, storage) / "train2017.h5"
            total, boxes, info = mask_bytes_per_image(files[storage])
            row = {"size": size, "storage": storage, "images": int(len(boxes)), "side": info["side"],
                   "bytes_per_box": info["per_row"], "mean": float(total.mean()), "max": float(total.max()),
                   "boxes_mean": float(boxes.mean()), "boxes_max": int(boxes.max()),
                   "zero_box_images": int((boxes == 0).sum()),
                   "file_per_image": info["file_bytes"] / len(boxes)}
            rows.append(row)
            print(f"  SAM @ {size}, {storage}: {info['side']}x{info['side']} logits, {info['per_row']:.0f} B per box "
                  f"(datasets: {', '.join(f'{k} {v}' for k, v in info['datasets'].items())}); per image mean "
                  f"{row['mean']:,.0f} B, max {row['max']:,.0f} B; boxes/image mean {row['boxes_mean']:.2f}, max "
                  f"{row['boxes_max']}, {row['zero_box_images']} images without boxes; whole file / image "
                  f"{row['file_per_image']:,.0f} B", flush=True)
        a, b = decoded_logits(files["float16"]), decoded_logits(files["int8"])
        err = np.abs(a - b)
        scale = np.abs(a).reshape(len(a), -1).max(1)
        inter = ((a > 0) & (b > 0)).sum(axis=(1, 2))
        union = ((a > 0) | (b > 0)).sum(axis=(1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        fid = {"size": size,
               "max_abs_err_over_absmax": float((err.reshape(len(a), -1).max(1) / np.maximum(scale, 1e-12)).max()),
               "mean_abs_err": float(err.mean()), "mask_iou_min": float(iou.min()), "mask_iou_mean": float(iou.mean()),
               "pixels_flipped": float(((a > 0) != (b > 0)).mean())}
        rows[-1]["fidelity"] = fid
        print(f"  int8 vs fp16 @ {size}: max |err| / max |logit| per mask {fid['max_abs_err_over_absmax']:.4f}, mean "
              f"|err| {fid['mean_abs_err']:.4f}; binarised (logit > 0) IoU mean {fid['mask_iou_mean']:.5f}, min "
              f"{fid['mask_iou_min']:.5f}; pixels flipped {fid['pixels_flipped'] * 100:.4f}%", flush=True)
    print("\n| SAM input | logits per box | storage | images | bytes / box | mask bytes / image, mean | max | boxes / "
          "image, mean (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['side']}x{r['side']} | {r['storage']} | {r['images']} | {r['bytes_per_box']:,.0f} | "
              f"{r['mean']:,.0f} | {r['max']:,.0f} | {r['boxes_mean']:.2f} ({r['boxes_max']}) |")
    results["bytes"] = rows


# -------------------------------------------------------------------------------------------- 2. decoder
def part_decoder(args, results) -> None:
    import torch

    from vfmkd.teachers.sam_teacher import SamTeacher

    print("\n== 2. SAM vit_b mask decoder per box vs the encoder (1 image, CPU) ==", flush=True)
    rows = []
    for size in args.decoder_sizes:
        with contextlib.redirect_stdout(io.StringIO()):
            teacher = SamTeacher(variant="vit_b", init=args.teacher_init, input_size=size).eval()
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(1, 3, size, size, generator=g)
        boxes = {}
        for k in args.decoder_boxes:
            xy = torch.rand(k, 2, generator=g) * size * 0.5
            wh = size * (0.125 + 0.375 * torch.rand(k, 2, generator=g))
            boxes[k] = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        feats = teacher.forward_features(pixels)  # warm-up
        for k in args.decoder_boxes:
            teacher.mask_logits(feats, boxes[k], torch.zeros(k, dtype=torch.long))
        times = {"encoder": [], **{k: [] for k in args.decoder_boxes}}
        load0 = _cpu_snapshot()
        for r in range(args.decoder_repeats):
            t0 = time.perf_counter()
            feats = teacher.forward_features(pixels)
            times["encoder"].append(time.perf_counter() - t0)
            for k in (args.decoder_boxes if r % 2 == 0 else args.decoder_boxes[::-1]):
                t0 = time.perf_counter()
                out = teacher.mask_logits(feats, boxes[k], torch.zeros(k, dtype=torch.long))
                times[k].append(time.perf_counter() - t0)
                assert out.shape == (k, size // 4, size // 4)
        enc = statistics.median(times["encoder"])
        print(f"  SAM @ {size}: encoder {enc * 1e3:.0f} ms/image; {idle_note(load0)}")
        for k in args.decoder_boxes:
            t = statistics.median(times[k])
            rows.append({"size": size, "encoder_ms": enc * 1e3, "boxes": k, "decoder_ms": t * 1e3,
                         "per_box_ms": t / k * 1e3,
                         "per_box_over_encoder": t / k / enc, "k_boxes_over_encoder": t / enc})
            print(f"    K={k:3d}: mask_logits {t * 1e3:8.1f} ms = {t / k * 1e3:6.1f} ms/box = {t / k / enc * 100:.2f}% "
                  f"of the encoder per box ({t / enc * 100:.1f}% for all {k})", flush=True)
        del teacher, feats
    print("\n| SAM input | encoder (ms/image) | boxes K | mask_logits (ms, K boxes) | ms / box | per box ÷ encoder | K "
          "boxes ÷ encoder |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['encoder_ms']:.0f} | {r['boxes']} | {r['decoder_ms']:.1f} | {r['per_box_ms']:.1f} | "
              f"{r['per_box_over_encoder']:.4f} | {r['k_boxes_over_encoder']:.3f} |")
    results["decoder"] = rows


# ----------------------------------------------------------------------------------------------- 3. step
def part_step(args, results) -> None:
    import torch
    from torch.utils.data import DataLoader

    from vfmkd.core.config import load_experiment
    from vfmkd.distillation.cached import collate_distill
    from vfmkd.engine.training.trainer import Trainer

    print("\n== 3. offline mask-distill train step vs task-only (YOLOv8n + yolo_seg_head @ 320, batch 8) ==",
          flush=True)
    batch, n = 8, 8 * args.step_batches
    cache = sam_cache(args, 512, n)  # the 512 fp16 cache of part 1 when N equals its image count
    run_root = Path(tempfile.mkdtemp(prefix="vfmkd_bench_seg_step_"))
    overrides = [f"teachers.sam.feature_path={cache}", f"teachers.sam.init={args.teacher_init}",
                 "teachers.sam.input_size=512",
                 "data.img_size=320", f"data.batch_size={batch}", f"data.limit={n}", "data.num_workers=0",
                 f"train.device={args.device}", f"work_dir={run_root}", "eval.fidelity=false"]
    trainers = {}
    for name in ("task-only", "mask-distill"):
        cfg = load_experiment(EXPERIMENTS / "yolov8n_seg_sam_coco128.yaml", overrides)
        if name == "task-only":
            cfg["distillation"]["losses"] = {k: v for k,
                                             v in cfg["distillation"]["losses"].items() if v["type"] in TASK_LOSSES}
            cfg["teachers"]["sam"]["enabled"] = False
        run_dir = run_root / name
        (run_dir / "checkpoints").mkdir(parents=True)
        trainers[name] = Trainer(cfg, run_dir=run_dir, progress=False)
        trainers[name].model.train(), trainers[name].distiller.train()
    logging.getLogger("vfmkd").setLevel(logging.WARNING)
    terms = {k: sorted(v["type"] for v in t.cfg["distillation"]["losses"].values()) for k, t in trainers.items()}
    distill_set = trainers["mask-distill"].train_loader.dataset
    assert distill_set.caches, "the mask-distill Trainer opened no cache"
    batches = list(DataLoader(distill_set, batch_size=batch, shuffle=False, num_workers=0, collate_fn=collate_distill))
    cpu_times = {k: [] for k in trainers}
    logs_seen = {}

    def step(name, item) -> float:
        tr = trainers[name]
        t0, c0 = time.perf_counter(), time.process_time()
        logs_seen[name] = tr.train_step(item, 1)
        torch.nn.utils.clip_grad_norm_(tr.params, tr.cfg["train"]["grad_clip"])
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.scheduler.step()
        cpu_times[name].append(time.process_time() - c0)
        return time.perf_counter() - t0

    names = list(trainers)
    for w in range(args.step_warmup):
        for name in names:
            step(name, batches[w % len(batches)])
    cpu_times = {k: [] for k in trainers}
    load0 = _cpu_snapshot()
    times, pairs = alternate_steps(step, names, batches, args.step_repeats, ("task-only", "mask-distill"))
    note = idle_note(load0)
    routes = trainers["mask-distill"].router.summary()["sam"]
    assert set(routes) == {"offline"}, f"mask-distill batches were not all read from the cache: {routes}"
    assert logs_seen["mask-distill"].get("loss_mask_distill", 0) > 0, logs_seen["mask-distill"]
    t_t, t_d = statistics.median(times["task-only"]), statistics.median(times["mask-distill"])
    cpu_ratio = statistics.median(cpu_times["task-only"]) / statistics.median(cpu_times["mask-distill"])
    row = {"task_ms": t_t * 1e3, "distill_ms": t_d * 1e3, "ratio": t_t / t_d, "paired": statistics.median(pairs),
           "cpu_ratio": cpu_ratio, "steps": len(times["task-only"]), "terms": terms, "note": note}
    print(f"  terms: {terms}")
    print(f"  task-only step    {t_t * 1e3:8.1f} ms (median of {row['steps']})")
    print(f"  mask-distill step {t_d * 1e3:8.1f} ms (+{(t_d - t_t) * 1e3:.1f} ms)")
    print(f"  t_task_only / t_mask_distill = {row['ratio']:.3f} (paired median {row['paired']:.3f}; by CPU time "
          f"{cpu_ratio:.3f}; goal >= 0.9: {'MET' if row['ratio'] >= 0.9 else 'MISSED'}); {note}", flush=True)
    results["step"] = row
    shutil.rmtree(run_root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- 4. heads
HEADS = (  # (task, experiment, teacher, student img, metric keys)
    ("instance", "yolov8n_seg_sam_coco128", "sam", 320, ("mask_mAP50-95", "mask_mAP50")),
    ("semantic", "regnet_semantic_sam_coco128", "sam", 256, ("mIoU",)),
    ("binary", "lora_sam_binary_person_coco128", "lora_sam", 256, ("dice", "iou")),
)


def part_heads(args, results) -> None:
    from vfmkd.core.config import load_experiment
    from vfmkd.engine.training.trainer import Trainer

    n, size, epochs = args.heads_images, args.heads_teacher_input, args.heads_epochs
    print(f"\n== 4. each head with vs without distillation ({n} train / {n} val images, {epochs} epochs, teachers @ "
          f"{size}, init={args.teacher_init}) ==", flush=True)
    caches = {t: sam_cache(args, size, n, teacher=t) for t in ("sam", "lora_sam")}
    run_root = Path(tempfile.mkdtemp(prefix="vfmkd_bench_seg_heads_"))
    rows = []
    for task, exp, teacher, img, keys in HEADS:
        img = args.heads_img or img
        for variant in ("task only", "distilled"):
            overrides = [f"teachers.{teacher}.feature_path={caches[teacher]}",
                         f"teachers.{teacher}.init={args.teacher_init}",
                         f"teachers.{teacher}.input_size={size}", f"data.img_size={img}", "data.batch_size=8",
                         f"data.limit={n}", "data.num_workers=0", "eval.batch_size=8", "eval.fidelity=false",
                         f"train.device={args.device}", f"train.epochs={epochs}", "train.warmup_epochs=0",
                         "train.warmup_iters=4",
                         f"train.save_period={epochs}", "train.vis_interval=0",
                         f"work_dir={run_root / variant.replace(' ', '_')}"]
            if teacher == "lora_sam":
                overrides += [f"teachers.lora_sam.lora_checkpoint={args.lora_checkpoint}"]
            cfg = load_experiment(EXPERIMENTS / f"{exp}.yaml", overrides)
            if variant == "task only":
                cfg["distillation"]["losses"] = {k: v for k,
                                                 v in cfg["distillation"]["losses"].items() if v["type"] in TASK_LOSSES}
                cfg["teachers"][teacher]["enabled"] = False
            terms = sorted(cfg["distillation"]["losses"])
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                trainer = Trainer(cfg, progress=False)
                logging.getLogger("vfmkd").setLevel(logging.WARNING)
                metrics = trainer.fit()
            seconds = time.perf_counter() - t0
            if variant == "distilled":
                routes = trainer.router.summary()[teacher]
                assert set(routes) == {"offline"}, routes
            last = metrics["epochs"][-1]
            val = last["val"][task]
            row = {"task": task, "experiment": exp, "variant": variant, "terms": terms, "seconds": seconds,
                   **{k: float(val[k]) for k in keys},
                   "train_task_loss": last["train"].get("loss_task", last["train"].get("loss")),
                   "train_loss": last["train"].get("loss")}
            if task == "instance":
                row["box_mAP50-95"] = float(val.get("mAP50-95",
                                                    last["val"].get("detection", {}).get("mAP50-95", float("nan"))))
            rows.append(row)
            print(f"  {task:8s} {variant:9s}: " + ", ".join(f"{k} {row[k]:.4f}" for k in keys) +
                  f"; last-epoch train loss_task {row['train_task_loss']:.4f}; {seconds:.0f} s; terms {terms}",
                  flush=True)
    print("\n| head (experiment) | metric on val2017 | task only | distilled (random teacher) | Δ |")
    print("|---|---|---|---|---|")
    for task, exp, _, img, keys in HEADS:
        img = args.heads_img or img
        a, b = (next(r for r in rows if r["task"] == task and r["variant"] == v) for v in ("task only", "distilled"))
        for k in keys:
            print(f"| {task} ({exp}, img {img}) | {k} | {a[k]:.4f} | {b[k]:.4f} | {b[k] - a[k]:+.4f} |")
    results["heads"] = rows
    shutil.rmtree(run_root, ignore_errors=True)


def main() -> int:
    args = parse_args()
    malloc = apply_malloc_mode(args.malloc)
    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("vfmkd").setLevel(logging.WARNING)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"malloc {malloc}; teachers init={args.teacher_init}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results = {"args": vars(args)}
    start = time.perf_counter()
    for part, fn in (("bytes", part_bytes), ("decoder", part_decoder), ("step", part_step), ("heads", part_heads)):
        if part in args.only:
            t = time.perf_counter()
            fn(args, results)
            print(f"  [{part}: {time.perf_counter() - t:.0f} s]", flush=True)
    out = Path(args.cache_root) / ("bench_seg_distill_quick.json" if args.quick else "bench_seg_distill.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}  # parts not run this time are kept
    out.write_text(json.dumps({**previous, **results}, indent=1, default=str))
    print(f"\ntotal {time.perf_counter() - start:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
