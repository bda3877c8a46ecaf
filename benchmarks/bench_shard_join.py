#!/usr/bin/env python
"""Time from the last shard finished to a usable cache: the shard index vs the copy-join (issue 21).

    python benchmarks/bench_shard_join.py                      # 0.25, 1 and 4 GB of SAM@1024 fp16 shards, 4 ranks
    python benchmarks/bench_shard_join.py --sizes 1 4 10 --shards 8 --dir /big/disk

For each size, synthetic shards ``train.shard<r>of<N>.h5`` are written as the ranks leave them: each
created by the real :class:`FeatureCacheWriter` (SAM ViT-B @ 1024: ``image_embeddings`` 256x64x64
float16, 2 MiB per image, one chunk per image, preallocated), then filled with random features,
geometry, per-image moments and ``done`` through h5py directly (the values do not change either path's
cost, and this writes gigabytes in seconds). Then, timed from the same state:

* index: :func:`vfmkd.cache.shards.index_shards` (the default since issue 21): the small ``train.h5``
  index over the shards, plus opening it with :class:`FeatureCacheReader` and reading one image;
* copy-join: :func:`vfmkd.cache.shards.merge_shards` (``--join``, the only way before issue 21): one
  self-contained ``train.h5``, plus the same open and read.

Before each timed step the page cache is dropped when ``/proc/sys/vm/drop_caches`` is writable (root),
so the join reads the shards from disk as it would after a long run; otherwise both start warm (the
shards just written) and the line says so. Prints seconds and the ratio copy-join / index per size;
the goal is an index time independent of the size (seconds at 10 GB). Both paths compute the
whole-cache statistics the same way (``codec.store_statistics``); its share is printed separately
(``statistics``): mean/std combine the per-image moments (tens of bytes per image); any statistic that
re-reads every feature there is a cost proportional to the cache, for both paths.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, quiet  # noqa: E402
from vfmkd.cache import codec  # noqa: E402
from vfmkd.cache.reader import FeatureCacheReader  # noqa: E402
from vfmkd.cache.shards import index_shards, merge_shards, shard_file, shard_range  # noqa: E402
from vfmkd.cache.writer import FeatureCacheWriter  # noqa: E402
from vfmkd.core.feature_spec import FeatureSpec  # noqa: E402
from vfmkd.core.fingerprint import TeacherFingerprint  # noqa: E402

DROP = Path("/proc/sys/vm/drop_caches")
SPEC = FeatureSpec("image_embeddings", 256, 16)
SIZE, BATCH, BLOCK = 1024, 4, 64
FINGERPRINT = TeacherFingerprint("sam", "vit_b", "random-init:seed0", SIZE, "float32", "sam-resize-longest-pad")


def writer(path: Path, ids: list[str]) -> FeatureCacheWriter:
    return FeatureCacheWriter(path, ids, FINGERPRINT, [SPEC], SIZE, teacher_config={"type": "sam"},
                              dataset="synthetic", split="train", batch_size=BATCH, teacher="sam",
                              extra_attrs={"compute": "synthetic"})


def write_shards(out: Path, ids: list[str], world: int, rng: np.random.Generator) -> None:
    """The shards ``world`` ranks leave: preallocated by the real writer, filled BLOCK images at a time."""
    side = SIZE // SPEC.stride
    one = rng.standard_normal((1, SPEC.channels, side, side), np.float32).astype(np.float16)
    block = np.repeat(one, BLOCK, axis=0)  # one random image repeated: the bytes' cost, not the RNG's
    moments = np.repeat(codec.image_moments(one, np.full(1, side), np.full(1, side)), BLOCK, axis=0)
    for r in range(world):
        start, stop = shard_range(len(ids), BATCH, r, world)
        with writer(shard_file(out, r, world), ids[start:stop]) as w:
            f = w._file
            for a in range(0, stop - start, BLOCK):
                b = min(a + BLOCK, stop - start)
                f["features/image_embeddings"][a:b] = block[:b - a]
                f["stats/image_embeddings/image_moments"][a:b] = moments[:b - a]
            f["affine"][:] = [SIZE / 640, SIZE / 640, 0, 0]
            f["valid_hw"][:] = [SIZE, SIZE]
            f["orig_hw"][:] = [640, 640]
            f["done"][:] = True


STATS_SECONDS = [0.0]  # time inside codec.store_statistics (the whole-cache statistics), both paths


def timed_statistics(original):
    def store_statistics(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            STATS_SECONDS[0] += time.perf_counter() - t0
    return store_statistics


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        DROP.write_text("3\n")
        return True
    except OSError:
        return False


def usable(out: Path, image_id: str) -> None:
    reader = FeatureCacheReader(out)
    reader.read(image_id)
    reader.close()


def measure(folder: Path, gigabytes: float, world: int, seed: int) -> dict:
    per_image = SPEC.channels * (SIZE // SPEC.stride) ** 2 * 2
    n = max(world * BATCH, int(gigabytes * 2**30 / per_image) // BATCH * BATCH)
    ids = [f"{i:09d}" for i in range(n)]
    out = folder / "train.h5"
    t0 = time.perf_counter()
    write_shards(out, ids, world, np.random.default_rng(seed))
    written = time.perf_counter() - t0
    cold = drop_caches()
    t0, STATS_SECONDS[0] = time.perf_counter(), 0.0
    index_shards(out, ids, BATCH, world)
    usable(out, ids[-1])
    index, index_stats = time.perf_counter() - t0, STATS_SECONDS[0]
    index_bytes = out.stat().st_size
    out.unlink()
    drop_caches()
    t0, STATS_SECONDS[0] = time.perf_counter(), 0.0
    merge_shards(out, ids, BATCH, world, lambda path: writer(path, ids))
    usable(out, ids[-1])
    join, join_stats = time.perf_counter() - t0, STATS_SECONDS[0]
    return {"gigabytes": n * per_image / 2**30, "images": n, "shards": world, "write_s": written, "index_s": index,
            "join_s": join, "index_stats_s": index_stats, "join_stats_s": join_stats, "index_bytes": index_bytes,
            "cold": cold}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0, 4.0], help="cache sizes in GiB")
    p.add_argument("--shards", type=int, default=4, help="ranks that wrote the shards")
    p.add_argument("--dir", type=Path, default=None, help="where to write (needs 2x the largest size free)")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    quiet()
    codec.store_statistics = timed_statistics(codec.store_statistics)
    print(machine())
    rows = []
    for gb in a.sizes:
        with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
            free = shutil.disk_usage(tmp).free / 2**30
            if free < 2.2 * gb:
                sys.exit(f"{gb} GiB needs {2.2 * gb:.1f} GiB free in {tmp}, {free:.1f} there: pass --dir or --sizes")
            rows.append(measure(Path(tmp), gb, a.shards, seed=len(rows)))
        r = rows[-1]
        print(f"{r['gigabytes']:6.2f} GiB ({r['images']} images, {r['shards']} shards; shards written in "
              f"{r['write_s']:.1f} s): index {r['index_s']:6.2f} s ({r['index_bytes'] / 2**10:.0f} KiB; statistics "
              f"{r['index_stats_s']:.2f} s)  copy-join {r['join_s']:7.2f} s (statistics {r['join_stats_s']:.2f} s)  "
              f"join / index {r['join_s'] / r['index_s']:6.1f}x; without the statistics "
              f"{r['index_s'] - r['index_stats_s']:.2f} s vs {r['join_s'] - r['join_stats_s']:.2f} s = "
              f"{(r['join_s'] - r['join_stats_s']) / (r['index_s'] - r['index_stats_s']):.1f}x"
              f"{'' if r['cold'] else '  (page cache not dropped: not root; shards warm)'}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
