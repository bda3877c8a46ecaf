"""Sharded feature caching (``torchrun --nproc_per_node N tools/prepare_teacher_features.py ...``).

The batches [k*B, (k+1)*B) of the sorted image list are split into N contiguous blocks, one per rank;
rank r caches its block into ``<split>.shard<r>of<N>.h5``, an ordinary cache of that contiguous image
sub-list (same batch size, so batch boundaries coincide with the single-process run's and the usual
per-file resume and writer lock apply per shard). Rank 0 then joins the shards: it creates the full
cache through the same :class:`FeatureCacheWriter` (same layout and attributes) under a temp name,
copies every per-image dataset (values, scales, geometry, per-image moments, the mask logits' rows
of those images, then ``done``), computes
the statistics exactly as the single-process path does (``store_statistics`` over the per-image
moments in image order), fsyncs, renames it to ``<split>.h5`` and removes the shards. The result
equals a single-process cache bit for bit (given the same torch thread count per process).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from vfmkd.cache.codec import MASK_GROUPS
from vfmkd.cache.lock import CacheLock
from vfmkd.cache.writer import FeatureCacheWriter
from vfmkd.core.errors import CacheMismatchError

COPY_ROWS = 64  # images copied per slice: bounded memory for large caches
NOT_PER_IMAGE = ("image_ids", "done")  # written by the writer itself / last
#: mask datasets the writer fills at creation from the full plan
MASK_PLAN_DATASETS = tuple(f"{MASK_GROUPS[False]}/{n}" for n in ("offsets", "label_index", "cls"))


def shard_range(n_images: int, batch_size: int, rank: int, world: int) -> Tuple[int, int]:
    """Images [start, stop) of ``rank``'s shard: a contiguous block of whole batches (empty when there
    are fewer batches than ranks)."""
    batches = math.ceil(n_images / batch_size)
    lo, hi = rank * batches // world, (rank + 1) * batches // world
    return min(lo * batch_size, n_images), min(hi * batch_size, n_images)


def shard_file(out_file: Path, rank: int, world: int) -> Path:
    """``<dir>/<split>.shard<r>of<N>.h5`` next to ``out_file``."""
    return out_file.with_name(f"{out_file.stem}.shard{rank}of{world}{out_file.suffix}")


def temp_file(out_file: Path) -> Path:
    return out_file.with_name(out_file.name + ".merging")


def _per_image_datasets(f: h5py.File) -> List[str]:
    names: List[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return [n for n in names if n not in NOT_PER_IMAGE + MASK_PLAN_DATASETS
            and not (n.startswith("stats/") and n.rsplit("/", 1)[1] in ("mean", "std"))]


def _is_mask_rows(name: str) -> bool:
    """A dataset indexed by mask row (label box), not by image: logits, scale, boxes of either pass."""
    return name.split("/", 1)[0] in MASK_GROUPS.values()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def merge_shards(
    out_file: Path,
    image_ids: Sequence[str],
    batch_size: int,
    world: int,
    make_writer: Callable[[Path], FeatureCacheWriter],
) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """Join the ``world`` finished shards of ``out_file`` into it (atomically: temp file + rename) and remove
    them. ``make_writer(path)`` builds the writer of the full cache exactly as a single-process run would.
    Returns the statistics ({name: (mean, std)})."""
    n = len(image_ids)
    shards = [(shard_file(out_file, r, world), *shard_range(n, batch_size, r, world)) for r in range(world)]
    shards = [s for s in shards if s[2] > s[1]]
    lock = CacheLock(out_file).acquire()  # no other writer of the final file while we build it
    try:
        for path, start, stop in shards:
            if not path.exists():
                raise CacheMismatchError(f"shard {path} (images {start}..{stop - 1}) is missing; rerun the same "
                                         f"torchrun command to recompute it")
        tmp = temp_file(out_file)
        tmp.unlink(missing_ok=True)  # a merge killed earlier: start it again
        writer = make_writer(tmp)
        try:
            f = writer._file
            for path, start, stop in shards:
                with h5py.File(path, "r") as s:
                    ids = list(s["image_ids"].asstr()[:])
                    if ids != list(image_ids[start:stop]) or not s["done"][:].all():
                        raise CacheMismatchError(f"shard {path} does not hold the finished images {start}..{stop - 1} "
                                                 f"of this run; rerun the same torchrun command (it resumes the shard)")
                    for name in _per_image_datasets(s):
                        lo, rows = (
                            (int(f["masks/offsets"][start]), len(s[name]))
                            if _is_mask_rows(name)
                            else (start, stop - start)
                        )
                        for a in range(0, rows, COPY_ROWS):
                            b = min(a + COPY_ROWS, rows)
                            f[name][lo + a:lo + b] = s[name][a:b]
            f.flush()  # data on disk before the images are marked done
            for path, start, stop in shards:
                with h5py.File(path, "r") as s:
                    f["done"][start:stop] = s["done"][:]
            f.flush()
            stats = writer.finalize()
        finally:
            writer.close()
        if stats is None:
            raise CacheMismatchError(f"{tmp}: the shards do not cover all {n} images; rerun the same torchrun command")
        _fsync(tmp)
        os.replace(tmp, out_file)
        _fsync(out_file.parent)
        for path, _, _ in shards:
            path.unlink(missing_ok=True)
        return stats
    finally:
        lock.release()
