#!/usr/bin/env python
"""Random-order read throughput of cached teacher features: HDF5 vs one file per image (.npy, .pt).

    python benchmarks/bench_cache_read.py            # N=128, SAM 256x64x64 (1024 input) and 256x32x32 (512 input)
    python benchmarks/bench_cache_read.py --quick    # < 60 s

Variants, all on the same synthetic fp16 features (random normal values of the true SAM shapes; the
read path does not depend on the values) and the same random order per repeat:

* ``hdf5 reader``: the real ``FeatureCacheReader.read(image_id)`` (features + affine + valid_hw) of a
  file written by the real ``FeatureCacheWriter`` (chunks of one image, no compression).
* ``hdf5 raw``: plain h5py indexing ``ds[i]`` on the same file, the dataset handle kept open.
* ``hdf5 256KiB-preads (exp.)``: a local experiment for a proposed library change, not library code
  (``PieceReader``): the same chunk read with ``os.preadv`` in 256 KiB pieces, on a byte copy of the file.
* ``npy``: one ``<id>.npy`` per image, ``np.load``.
* ``pt``: one ``<id>.pt`` per image, ``torch.save`` / ``torch.load(weights_only=True)`` (torchdistill's cache format).

Page-cache states (when ``/proc/sys/vm/drop_caches`` is writable, i.e. root; else only "warm", whatever
the writes left): "warm (sequential pre-read)": caches dropped, then every file read front to back (a
cache just copied in); "warm (after a random epoch)": caches dropped, then each variant reads all its
images once in a random order (what the first training epoch leaves; on Linux >= 6.x with large
page-cache folios this is NOT the same state: pages from one big random read are small folios and
copy out slower); "cold": ``sync; echo 3 > drop_caches`` before every timed pass (handles are opened
before the drop; the one-file-per-image formats pay their open per file, as they would).
Ratio = HDF5 images/s / the faster of npy and pt (goal >= 1.5). Medians over repeats, variants rotated.
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

import h5py
import numpy as np
import torch

from vfmkd.cache.reader import FeatureCacheReader
from vfmkd.cache.writer import FeatureCacheWriter
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.teachers.base import TeacherFingerprint

DROP = Path("/proc/sys/vm/drop_caches")


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
    p.add_argument("--images", type=int, default=128, help="N cached images")
    p.add_argument("--sides", type=int, nargs="+", default=[64, 32], help="feature side h=w (64: SAM @1024, 32: @512)")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="warm-cache timed passes per variant")
    p.add_argument("--cold-repeats", type=int, default=3, help="cold-cache passes per variant (0: skip)")
    p.add_argument("--workdir", default=None, help="where the files go (default: a temp dir on the same disk as /tmp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="< 60 s: N=64, 3 warm / 1 cold repeats")
    args = p.parse_args()
    if args.quick:
        args.images, args.repeats, args.cold_repeats = 64, 3, 1
    return args


def can_drop_caches() -> bool:
    try:
        os.sync()
        DROP.write_text("3\n")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    DROP.write_text("3\n")


class PieceReader:
    """Local experiment for a proposed FeatureCacheReader change (NOT library code): read an image's
    chunk (one image, no filter) with os.preadv at the chunk's byte offset in 256 KiB pieces instead
    of one HDF5 read_direct_chunk (a single 2 MiB pread). The kernel then sees a sequential stream
    inside each chunk (readahead, large page-cache folios) instead of one large random read."""

    def __init__(self, path: Path, piece: int = 256 << 10) -> None:
        self.base = FeatureCacheReader(path)
        self.f = h5py.File(path, "r")
        ds = self.f["features/image_embeddings"]
        self.fd, self.shape, self.dtype, self.piece = self.f.id.get_vfd_handle(), ds.shape[1:], ds.dtype, piece
        zeros = (0,) * (ds.ndim - 1)
        self.extent = [(c.byte_offset,
                        c.size) for c in (ds.id.get_chunk_info_by_coord((i,) + zeros) for i in range(ds.shape[0]))]

    def read(self, image_id: str) -> torch.Tensor:
        offset, size = self.extent[self.base.index_of(image_id)]
        out = np.empty(self.shape, self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        for s in range(0, size, self.piece):
            os.preadv(self.fd, [view[s:s + self.piece]], offset + s)
        return torch.from_numpy(out)

    def close(self) -> None:
        self.f.close()
        self.base.close()


def build_files(work: Path, n: int, c: int, side: int, seed: int):
    """Write the same N features as HDF5 (real writer), .npy files and .pt files."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:012d}" for i in range(n)]
    stride = 16
    spec = FeatureSpec("image_embeddings", c, stride)
    fp = TeacherFingerprint("sam", "vit_b", "synthetic", side * stride, "float32", "synthetic")
    h5 = work / f"side{side}" / "train2017.h5"
    npy_dir, pt_dir = work / f"side{side}" / "npy", work / f"side{side}" / "pt"
    npy_dir.mkdir(parents=True), pt_dir.mkdir(parents=True)
    first = None
    with FeatureCacheWriter(h5, ids, fp, [spec], side * stride, teacher_config={"type": "sam"}, dataset="synthetic",
                            split="train2017", batch_size=8) as w:
        for s in range(0, n, 8):
            b = min(8, n - s)
            arr = rng.standard_normal((b, c, side, side), dtype=np.float32).astype(np.float16)
            first = arr[0].copy() if first is None else first
            w.write(s, {"image_embeddings": torch.from_numpy(arr)}, torch.ones(b, 4), torch.full((b, 2), side * stride),
                    np.full((b, 2), 480))
            for k in range(b):
                np.save(npy_dir / f"{ids[s + k]}.npy", arr[k])
                torch.save(torch.from_numpy(arr[k].copy()), pt_dir / f"{ids[s + k]}.pt")
    os.sync()
    return ids, h5, npy_dir, pt_dir, first


def main() -> int:
    args = parse_args()
    torch.set_num_threads(2)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?")
    can_drop = can_drop_caches()
    cold = args.cold_repeats > 0 and can_drop
    fs = subprocess.run(["df", "-T", tempfile.gettempdir() if args.workdir is None else args.workdir],
                        capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, h5py {h5py.__version__} "
          f"(HDF5 {h5py.version.hdf5_version}), numpy {np.__version__}, filesystem {fs}")
    cold_note = (f"drop_caches before every pass, {args.cold_repeats} repeats" if cold
                 else "not measured (--cold-repeats 0)" if can_drop
                 else "NOT measured (drop_caches not writable): warm-cache only")
    print(f"N={args.images} synthetic fp16 feature maps per shape, random order, warm repeats {args.repeats}, "
          f"cold: {cold_note}\n")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vfmkd_bench_read_"))
    work.mkdir(parents=True, exist_ok=True)
    table = []
    try:
        for side in args.sides:
            ids, h5, npy_dir, pt_dir, first = build_files(work, args.images, args.channels, side, args.seed)
            nbytes = args.channels * side * side * 2
            h5_copy = h5.with_name("copy_for_experiment.h5")
            shutil.copyfile(h5, h5_copy)
            os.sync()
            sizes = {"hdf5": h5.stat().st_size / args.images,
                     "npy": sum(p.stat().st_size for p in npy_dir.iterdir()) / args.images,
                     "pt": sum(p.stat().st_size for p in pt_dir.iterdir()) / args.images}
            all_files = [h5, h5_copy] + sorted(npy_dir.iterdir()) + sorted(pt_dir.iterdir())

            def open_all():
                reader = FeatureCacheReader(h5)
                # Local experiment (not library code), on a byte copy of the file so that its page-cache
                # state is its own: the same chunk read as FeatureCacheReader, done with os.preadv in
                # 256 KiB pieces at the chunk's byte offset (see PieceReader).
                piece = PieceReader(h5_copy)
                raw_f = h5py.File(h5, "r")
                raw = raw_f["features/image_embeddings"]
                index = {i: k for k, i in enumerate(ids)}
                fns = {
                    "hdf5 reader": lambda i: reader.read(i)["features"]["image_embeddings"],
                    "hdf5 raw": lambda i: raw[index[i]],
                    "hdf5 256KiB-preads (exp.)": lambda i: piece.read(i),
                    "npy": lambda i: np.load(npy_dir / f"{i}.npy"),
                    "pt": lambda i: torch.load(pt_dir / f"{i}.pt", weights_only=True),
                }
                return fns, lambda: (reader.close(), piece.close(), raw_f.close())

            fns, close = open_all()
            for name, fn in fns.items():  # same bytes everywhere
                got = np.asarray(fn(ids[0]))
                assert got.dtype == np.float16 and np.array_equal(got, first), name
            names = list(fns)
            if can_drop:
                modes = [("warm (sequential pre-read)", args.repeats), ("warm (after a random epoch)", args.repeats),
                         ("cold", args.cold_repeats)]
            else:
                modes = [("warm", args.repeats)]
            results = {}
            load0 = _cpu_snapshot()
            for mode, reps in modes:
                if mode.startswith("warm") and can_drop:
                    # Which pages the kernel holds, and in what folio sizes, depends on how they were
                    # read: set it explicitly instead of inheriting what writing the files left.
                    close()
                    drop_caches()
                    fns, close = open_all()
                    if "sequential" in mode:  # e.g. a cache just copied in, or cat'ed
                        for path in all_files:
                            with open(path, "rb") as fh:
                                while fh.read(8 << 20):
                                    pass
                    else:  # what a first training epoch leaves: each variant read once in random order
                        first_epoch = [ids[k] for k in np.random.default_rng(args.seed + 1).permutation(len(ids))]
                        for fn in fns.values():
                            for i in first_epoch:
                                fn(i)
                elif not can_drop:
                    for fn in fns.values():
                        for i in ids:
                            fn(i)
                times = {k: [] for k in names}
                rng = np.random.default_rng(args.seed + side)
                for r in range(reps):
                    order = [ids[k] for k in rng.permutation(len(ids))]
                    for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                        if mode == "cold":
                            close()
                            fns, close = open_all()
                            drop_caches()
                        fn = fns[name]
                        t = time.perf_counter()
                        for i in order:
                            fn(i)
                        times[name].append(time.perf_counter() - t)
                if reps:
                    results[mode] = {k: args.images / statistics.median(v) for k, v in times.items()}
            close()

            shape = f"{args.channels}x{side}x{side}"
            print(f"features {shape} fp16 ({nbytes / 2**20:.2f} MiB/image; on disk per image: "
                  + ", ".join(f"{k} {v:,.0f} B" for k, v in sizes.items()) + ")")
            for mode, ips in results.items():
                best_file = max(ips["npy"], ips["pt"])
                best_name = "npy" if ips["npy"] >= ips["pt"] else "pt"
                for name in names:
                    ratio = ips[name] / best_file
                    print(f"  {mode:27s} {name:26s} {ips[name]:9.1f} images/s {ips[name] * nbytes / 2**20:8.0f} MiB/s"
                          f"   x{ratio:.2f} vs {best_name}")
                    table.append((shape, mode, name, ips[name], ips[name] * nbytes / 2**20, ratio, best_name))
                r = ips["hdf5 reader"] / best_file
                print(f"  -> {mode}: HDF5 (FeatureCacheReader.read) / faster of npy,pt ({best_name}) = {r:.2f}  "
                      f"(goal >= 1.5: {'MET' if r >= 1.5 else 'MISSED'}); raw h5py {ips['hdf5 raw'] / best_file:.2f}; "
                      f"256KiB-preads experiment {ips['hdf5 256KiB-preads (exp.)'] / best_file:.2f}")
            print(f"  {idle_note(load0)}\n", flush=True)
            shutil.rmtree(work / f"side{side}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| features | cache | variant | images/s | MiB/s | ratio vs faster of npy/pt |")
    print("|---|---|---|---|---|---|")
    for shape, mode, name, ips, mibs, ratio, best in table:
        print(f"| {shape} | {mode} | {name} | {ips:.1f} | {mibs:.0f} | {ratio:.2f} (vs {best}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
