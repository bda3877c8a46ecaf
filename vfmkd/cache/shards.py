"""Sharded feature caching (``torchrun --nproc_per_node N tools/prepare_teacher_features.py ...``).

The batches [k*B, (k+1)*B) of the sorted image list are split into N contiguous blocks, one per rank;
rank r caches its block into ``<split>.shard<r>of<N>.h5``, an ordinary cache of that contiguous image
sub-list (same batch size, so batch boundaries coincide with the single-process run's and the usual
per-file resume and writer lock apply per shard).

Once every shard is finished, rank 0 makes the split's cache usable in one of two ways:

* :func:`index_shards` (the default): ``<split>.h5`` becomes a small *index* over the shards, written in
  seconds whatever the cache's size. It holds the full cache's attributes plus ``shards`` (JSON
  ``[{file, start, stop, mask_rows}]``, file names relative to the index), the per-image arrays of
  every image (ids, done flags, geometry, mask offsets/rows/classes: tens of bytes per image, copied),
  the statistics (computed from the shards' per-image moments exactly as a single-process run does)
  and, for every per-image or per-mask array that stays in the shards (features, scales, moments, mask
  logits), an HDF5 *virtual dataset* mapping the shards' rows, so h5py or any HDF5 tool sees one
  complete cache. :class:`FeatureCacheReader` reads the features straight from the shard files (their
  one-chunk-per-image fast path) and checks at open that every shard is there.
* :func:`merge_shards` (``--join``): the copy into one self-contained ``<split>.h5`` through the same
  :class:`FeatureCacheWriter` (same layout and attributes), the shards removed afterwards: equal to a
  single-process cache bit for bit (given the same torch thread count per process); it costs one
  read and one write of the whole cache.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from vfmkd.cache import codec
from vfmkd.cache.codec import MASK_GROUPS
from vfmkd.cache.format import attr_value
from vfmkd.cache.lock import CacheLock
from vfmkd.cache.writer import INDEX_ATTR, FeatureCacheWriter
from vfmkd.core.errors import CacheMismatchError
from vfmkd.core.feature_spec import FeatureSpec

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


def finished_shards(out_file: Path, image_ids: Sequence[str], batch_size: int,
                    world: int) -> List[Tuple[Path, int, int]]:
    """(path, start, stop) of the ``world`` non-empty shards of ``out_file``, each checked to hold the
    finished images [start, stop) of ``image_ids`` with the first shard's fingerprint; CacheMismatchError
    naming the rerun otherwise."""
    n = len(image_ids)
    shards = [(shard_file(out_file, r, world), *shard_range(n, batch_size, r, world)) for r in range(world)]
    shards = [s for s in shards if s[2] > s[1]]
    fingerprint = None
    for path, start, stop in shards:
        if not path.exists():
            raise CacheMismatchError(f"shard {path} (images {start}..{stop - 1}) is missing; rerun the same "
                                     f"torchrun command to recompute it")
        with h5py.File(path, "r") as s:
            done = s["done"][:] & (s["masks_done"][:] if "masks_done" in s else True)
            fingerprint = fingerprint or s.attrs["fingerprint"]
            if list(s["image_ids"].asstr()[:]) != list(image_ids[start:stop]) or not done.all() \
                    or s.attrs["fingerprint"] != fingerprint:
                raise CacheMismatchError(f"shard {path} does not hold the finished images {start}..{stop - 1} "
                                         f"of this run; rerun the same torchrun command (it resumes the shard)")
    return shards


def _publish(tmp: Path, out_file: Path) -> None:
    """Rename the finished ``tmp`` to ``out_file``, durably (file and folder fsynced)."""
    _fsync(tmp)
    os.replace(tmp, out_file)
    _fsync(out_file.parent)


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
    lock = CacheLock(out_file).acquire()  # no other writer of the final file while we build it
    try:
        shards = finished_shards(out_file, image_ids, batch_size, world)
        tmp = temp_file(out_file)
        tmp.unlink(missing_ok=True)  # a merge killed earlier: start it again
        writer = make_writer(tmp)
        try:
            f = writer._file
            for path, start, stop in shards:
                with h5py.File(path, "r") as s:
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
        _publish(tmp, out_file)
        for path, _, _ in shards:
            path.unlink(missing_ok=True)
        return stats
    finally:
        lock.release()


# ---------------------------------------------------------------------- the index over the shards
#: per-image arrays copied into the index (tens of bytes per image), concatenated in image order
COPIED = ("image_ids", "orig_hw", "done", "masks_done", "masks/label_index", "masks/cls",
          *(name for _, *geometry in codec.FLIP_GROUPS.values() for name in geometry))


def index_temp_file(out_file: Path) -> Path:
    return out_file.with_name(out_file.name + ".indexing")


def shards_of(attrs: Any, index_file: Path) -> List[Tuple[Path, int, int]]:
    """(path, start, stop) of the shards an index file (its ``attrs``) maps; [] for an ordinary cache."""
    if INDEX_ATTR not in attrs:
        return []
    return [(index_file.with_name(d["file"]), int(d["start"]), int(d["stop"]))
            for d in json.loads(attr_value(attrs[INDEX_ATTR]))]


def index_world(out_file: Path) -> Optional[int]:
    """The shard count N of ``out_file`` when it is an index over ``<split>.shard<r>ofN.h5``, else None."""
    if not out_file.is_file():
        return None
    try:
        with h5py.File(out_file, "r") as f:
            return int(json.loads(attr_value(f.attrs[INDEX_ATTR]))[0]["world"]) if INDEX_ATTR in f.attrs else None
    except OSError:
        return None  # not HDF5: the writer names the problem


def cache_bytes(out_file: Path) -> int:
    """Bytes of the split's cache on disk: the file, plus its shards when it is an index."""
    with h5py.File(out_file, "r") as f:
        shards = shards_of(f.attrs, out_file)
    return out_file.stat().st_size + sum(p.stat().st_size for p, _, _ in shards)


def _virtual(f: h5py.File, name: str, sources: Sequence[Tuple[h5py.File, Path, int, int]]) -> None:
    """``name`` in the index: a virtual dataset stacking rows [lo, hi) of each shard's ``name``."""
    first = sources[0][0][name]
    total = sum(hi - lo for _, _, lo, hi in sources)
    layout = h5py.VirtualLayout(shape=(total, *first.shape[1:]), dtype=first.dtype)
    for s, path, lo, hi in sources:
        if hi > lo:
            layout[lo:hi] = h5py.VirtualSource(path.name, name, shape=s[name].shape)
    # a shard gone after indexing reads as NaN (the reader's finite check names it) where NaN exists
    fill = np.nan if first.dtype.kind == "f" else 0
    f.create_virtual_dataset(name, layout, fillvalue=fill)


def _write_index(f: h5py.File, files: Sequence[Tuple[h5py.File, Path, int, int]], world: int) -> None:
    """Attributes, copied per-image arrays, statistics datasets (NaN) and virtual datasets of the index."""
    names: List[str] = []
    files[0][0].visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    mask_base = np.cumsum([0] + [len(s["masks/label_index"]) if "masks" in s.attrs else 0 for s, *_ in files])
    table = [{"file": p.name, "start": a, "stop": b, "world": world, "mask_rows": [int(mask_base[k]),
                                                                                   int(mask_base[k + 1])]}
             for k, (_, p, a, b) in enumerate(files)]
    f.attrs.update({k: v for k, v in files[0][0].attrs.items()})
    f.attrs[INDEX_ATTR] = json.dumps(table)
    if "masks" in f.attrs:
        f.attrs["masks"] = json.dumps({**json.loads(attr_value(f.attrs["masks"])), "count": int(mask_base[-1])})
        f.create_dataset("masks/offsets", data=np.concatenate(
            [s["masks/offsets"][:-1] + mask_base[k] for k, (s, *_) in enumerate(files)] + [mask_base[-1:]]))
    for name in names:
        if name in COPIED:
            kw = {"dtype": h5py.string_dtype("utf-8")} if name == "image_ids" else {}
            f.create_dataset(name, data=np.concatenate([s[name][:] for s, *_ in files]), **kw)
        elif name.startswith("stats/") and name.rsplit("/", 1)[1] in ("mean", "std"):
            codec.alloc_dataset(f, name, files[0][0][name].shape, np.float32, fill=np.nan)
        elif name.startswith("stats/") and not name.endswith("/image_moments"):
            continue  # whole-cache statistics: store_statistics computes them for the index
        elif name != "masks/offsets":
            rows = [(int(mask_base[k]), int(mask_base[k + 1])) if _is_mask_rows(name) else (a, b)
                    for k, (_, _, a, b) in enumerate(files)]
            _virtual(f, name, [(s, p, lo, hi) for (s, p, _, _), (lo, hi) in zip(files, rows)])


def index_shards(out_file: Path, image_ids: Sequence[str], batch_size: int,
                 world: int) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """Write ``out_file`` as the index over its ``world`` finished shards (atomically: temp file + rename;
    the shards stay); seconds whatever the cache's size. Returns the statistics ({name: (mean, std)})."""
    lock = CacheLock(out_file).acquire()  # no other writer of the split's file while we build it
    try:
        shards = finished_shards(out_file, image_ids, batch_size, world)
        tmp = index_temp_file(out_file)
        tmp.unlink(missing_ok=True)  # an indexing killed earlier: start it again
        with ExitStack() as stack, h5py.File(tmp, "w") as f:
            _write_index(f, [(stack.enter_context(h5py.File(p, "r")), p, a, b) for p, a, b in shards], world)
        # shards closed: HDF5 opens a virtual dataset's sources with the index's own (read-write) access
        with h5py.File(tmp, "r+") as f:
            specs = [FeatureSpec(**d) for d in json.loads(attr_value(f.attrs["feature_specs"]))]
            stats = codec.store_statistics(f, specs, attr_value(f.attrs["storage"]))
        if stats is None:
            raise CacheMismatchError(f"{tmp}: the shards do not cover all {len(image_ids)} images; rerun the same "
                                     f"torchrun command")
        _publish(tmp, out_file)
        return stats
    finally:
        lock.release()
