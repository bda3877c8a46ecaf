#!/usr/bin/env python
"""Teacher-feature cache storage: float16 vs int8 (per-cell absmax) side by side, in one run.

    python benchmarks/bench_cache_storage.py            # SAM vit_b @ 1024 on 6 coco128 images, 192-image files
    python benchmarks/bench_cache_storage.py --quick    # @ 256, 4 images, 64-image files (< 60 s)

1. Features: the real SAM image encoder (``teacher.init=random``: no weights here, so the values are
   a random-init ViT's, not pretrained SAM's) on K coco128 images: ``image_embeddings`` (256 ch) and
   ``trunk`` (768 ch), plus three stress variants of what pretrained ViTs do and random ones do not:
   4 outlier channels x30, channel scales log-uniform over 3 decades (LayerNorm gains), and 2
   high-norm cells x30 / x20 (register-like tokens).
2. Fidelity vs the float16 cache (what training would read otherwise), through real cache files:
   mean cosine per cell over channels, relative L2 error, and the RMS error after per-channel
   standardisation with the cache's own statistics (what a standardised feature loss sees; overall
   and worst channel, in units of that channel's std). Also the single-factor layout (one absmax
   scale per cell, no channel factor), computed in memory, to show why the codec has two factors.
3. Bytes per image: the codec formula and the file size / N of files written by the real
   ``FeatureCacheWriter`` (the K maps tiled to N images).
4. Random-read throughput of ``FeatureCacheReader.read(id)`` (features incl. int8 dequantisation to
   float16, affine, valid_hw) on image_embeddings-only files (the tool's default), one torch thread
   as in a DataLoader worker, all N images in a fresh random order per pass, the files alternating;
   medians over repeats. Warm: page cache hot. Cold: ``posix_fadvise(DONTNEED)`` evicts the file
   before each pass (no root needed; ``fincore`` reports what stayed resident). Also the previous
   reader's path (h5py ``ds[i]`` slicing, geometry from the file) for reference, and int8 read with
   ``dequantize=False`` (int8 + scales, dequantised later in batch, e.g. on the GPU).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vfmkd.cache import (  # noqa: E402
    FeatureCacheReader,
    FeatureCacheWriter,
    codec,  # noqa: E402
)
from vfmkd.datasets import list_images, load_rgb  # noqa: E402
from vfmkd.teachers.sam_teacher import SamTeacher  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="input 256, 4 images, 64-image files, 3 repeats")
    p.add_argument("--input-size", type=int, help="teacher input (default 1024, quick 256)")
    p.add_argument("--images", type=int, help="images run through the teacher (default 6, quick 4)")
    p.add_argument("--file-images", type=int, help="images per cache file for the read benchmark (default 192, quick "
                                                   "64)")
    p.add_argument("--repeats", type=int, help="timed passes per file and regime (default 5, quick 3)")
    p.add_argument("--workdir", help="where the cache files go (default: a temp dir on /tmp, removed afterwards)")
    a = p.parse_args()
    q = a.quick
    a.input_size = a.input_size or (256 if q else 1024)
    a.images = a.images or (4 if q else 6)
    a.file_images = a.file_images or (64 if q else 192)
    a.repeats = a.repeats or (3 if q else 5)
    return a


def teacher_features(size: int, k: int):
    torch.manual_seed(0)
    teacher = SamTeacher(init="random", input_size=size)
    paths = list_images(REPO / "datasets" / "coco128", "train2017", k)
    feats, affine, valid = {}, [], []
    t0 = time.perf_counter()
    for p in paths:  # one image per forward: memory stays small at 1024
        f, geo = teacher.extract_features([load_rgb(p)])
        for name, v in f.items():
            feats.setdefault(name, []).append(v)
        affine.append(geo.affine)
        valid.append(geo.valid_hw.float())
    print(f"teacher: SAM vit_b random-init @ {size}, {k} coco128 images in {time.perf_counter() - t0:.0f} s")
    return teacher, {n: torch.cat(v) for n, v in feats.items()}, torch.cat(affine), torch.cat(valid)


def write(path: Path, teacher, feats, affine, valid, n: int, storage: str) -> FeatureCacheReader:
    k = affine.shape[0]
    specs = tuple(s for s in teacher.feature_specs() if s.name in feats)
    with FeatureCacheWriter(path, [f"im{i:05d}" for i in range(n)], teacher.fingerprint(), specs, teacher.input_size,
                            teacher_config={"type": "sam"}, dataset="coco128", split="bench", batch_size=k,
                            storage=storage) as w:
        for s in range(0, n, k):
            b = min(k, n - s)
            w.write(s, {m: v[:b] for m, v in feats.items()}, affine[:b], valid[:b], np.full((b, 2), 480))
        w.finalize()
    return FeatureCacheReader(path)


def cell_only(x: torch.Tensor) -> torch.Tensor:
    """The single-factor int8 layout: one absmax scale per cell, decoded to float16."""
    scale = (x.abs().amax(1, keepdim=True) / 127).clamp_min(1e-30)
    return (torch.round(x / scale).clamp(-127, 127) * scale).half()


def fidelity(f16: FeatureCacheReader, i8: FeatureCacheReader, live, k: int, name: str):
    """{variant: (cosine, rel L2, z-RMS, worst-channel z-RMS)} of ``name`` against the float16 cache."""
    a = torch.stack([f16.read(f"im{i:05d}")["features"][name] for i in range(k)]).float()
    mean, std = f16.stats(name)
    out = {}
    for variant, b in (("int8 (cache)", torch.stack([i8.read(f"im{i:05d}")["features"][name] for i in range(k)])),
                       ("int8 cell-only", cell_only(live[name].float())), ("fp32 (live)", live[name])):
        b = b.float()
        z = ((b - a) / std[:, None, None]).square().mean(dim=(0, 2, 3))  # per channel
        out[variant] = (F.cosine_similarity(a, b, dim=1).mean().item(), ((b - a).norm() / a.norm()).item(),
                        z.mean().sqrt().item(), z.max().sqrt().item())
    return out


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: Path) -> str:
    """Share of the file in the page cache (fincore), '?' without it."""
    if not shutil.which("fincore"):
        return "?"
    out = subprocess.run(["fincore", "-nb", "-o", "RES", str(path)], capture_output=True, text=True).stdout.split()
    return f"{int(out[-1]) / path.stat().st_size:.0%}" if out and out[-1].isdigit() else "?"


def timed_pass(fn, ids, rng) -> float:
    order = rng.permutation(len(ids))
    t0 = time.perf_counter()
    for i in order:
        fn(ids[i])
    return (time.perf_counter() - t0) / len(ids)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(2)
    teacher, feats, affine, valid = teacher_features(args.input_size, args.images)
    cases = {"image_embeddings": feats, "trunk": feats}
    out = {n: t.clone() for n, t in feats.items()}
    out["trunk"][:, :4] *= 30
    cases["trunk, 4 ch x30"] = out
    gains = torch.logspace(-1.5, 1.5, 256)[torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    cases["image_emb., ch gains 10^+-1.5"] = {
        "image_embeddings": feats["image_embeddings"] * gains[None, :, None, None]
    }
    cells = {"trunk": feats["trunk"].clone()}
    cells["trunk"][..., 1, 1] *= 30
    cells["trunk"][..., -3, 2] *= 20
    cases["trunk, 2 cells x30/x20"] = cells
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_cache_storage_"))
    work.mkdir(parents=True, exist_ok=True)
    opened = []
    try:
        k, side = args.images, args.input_size // 16
        print(f"\n== bytes per image (input {args.input_size}: {side}x{side} cells)")
        for name, c in (("image_embeddings", 256), ("trunk", 768)):
            b16, b8 = (codec.feature_bytes(s, c, side, side) for s in codec.STORAGES)
            print(f"  {name:17s} {c}x{side}x{side}: float16 {b16:>9,d} B ({b16 / 2**20:.4f} MiB)  int8 {b8:>9,d} B "
                  f"({b8 / 2**20:.4f} MiB)  int8/fp16 = {b8 / b16:.3f}")
        emb = {"image_embeddings": feats["image_embeddings"]}  # the tool's default map: the read benchmark's files
        files = {s: work / f"read_{s}.h5" for s in codec.STORAGES}
        readers = {s: write(files[s], teacher, emb, affine, valid, args.file_images, s) for s in codec.STORAGES}
        opened += readers.values()
        for s, r in readers.items():
            feat, other = r.bytes_per_image()
            print(f"  file {s:7s} (image_embeddings): {files[s].stat().st_size / args.file_images:>11,.0f} B/image on "
                  f"disk (formula {feat:,d} B features + {other:,d} B geometry/statistics)")

        print(f"\n== fidelity vs the float16 cache, {k} images; z = error / channel std (cache statistics)")
        print(f"  {'case':30s} {'variant':15s} {'cosine':>9s} {'rel L2':>8s} {'z-RMS':>7s} {'worst ch':>8s}")
        for case, fs in cases.items():
            pair = [write(work / f"fid_{len(opened)}_{s}.h5", teacher, fs, affine, valid, k, s) for s in codec.STORAGES]
            opened += pair
            name = case.split(",")[0] if case.split(",")[0] in fs else next(iter(fs))
            for variant, r in fidelity(*pair, fs, k, name).items():
                print(f"  {case:30s} {variant:15s} {r[0]:9.6f} {r[1]:8.4f} {r[2]:7.4f} {r[3]:8.4f}")

        torch.set_num_threads(1)  # a DataLoader worker
        ids = readers["float16"].image_ids
        h16 = h5py.File(files["float16"], "r")

        def legacy(image_id: str):  # FeatureCacheReader.read before direct chunk reads and in-memory geometry
            i = int(image_id[2:])
            return {"features": {"image_embeddings": torch.from_numpy(h16["features"]["image_embeddings"][i])},
                    "affine": torch.from_numpy(h16["affine"][i]), "valid_hw": torch.from_numpy(h16["valid_hw"][i])}

        variants = {"float16": readers["float16"].read, "int8": readers["int8"].read,
                    "int8 dequantize=False": lambda i: readers["int8"].read(i, dequantize=False),
                    "float16 h5py ds[i] (old reader)": legacy}
        file_of = {v: files["int8" if v.startswith("int8") else "float16"] for v in variants}
        per_image = {v: file_of[v].stat().st_size / args.file_images for v in variants}
        rng = np.random.default_rng(0)
        evict(files["float16"])
        cold_resident = resident(files["float16"])
        results = {}
        for regime in ("warm", "cold"):
            times = {v: [] for v in variants}
            for fn in variants.values():  # warm-up: handles open, pages in
                timed_pass(fn, ids, rng)
            for _ in range(args.repeats):
                for v, fn in variants.items():
                    if regime == "cold":
                        evict(file_of[v])
                    times[v].append(timed_pass(fn, ids, rng))
            results[regime] = {v: statistics.median(t) for v, t in times.items()}
        h16.close()
        print(f"\n== random reads, {args.file_images} images x {args.repeats} passes, torch 1 thread; "
              f"image_embeddings 256x{side}x{side} "
              f"(cold: {cold_resident} of the fp16 file resident right after eviction)")
        for regime, res in results.items():
            for v, t in res.items():
                print(f"  {regime:4s} {v:32s} {t * 1e3:7.3f} ms/image  {1 / t:8.0f} images/s  "
                      f"{per_image[v] / t / 2**20:7.0f} MiB/s  x{res['float16'] / t:.2f} vs float16")
        q = [readers["int8"]._array("features/image_embeddings" + x, 0) for x in ("", *codec.SCALES.values())]
        n_dec = 200
        t0 = time.perf_counter()
        for _ in range(n_dec):
            codec.decode_int8(*q)
        print(f"  int8 dequantisation alone (image_embeddings {tuple(q[0].shape)} -> float16): "
              f"{(time.perf_counter() - t0) / n_dec * 1e3:.3f} ms")
    finally:
        for r in opened:
            r.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
