#!/usr/bin/env python
"""The cached-target loader alone (no model, no images) vs the raw read rate of the same file (issue 21).

    python benchmarks/bench_cache_loader.py                  # SAM@1024 fp16 and int8, 256 images each
    python benchmarks/bench_cache_loader.py --images 1024 --workers 0 2 4 8 --repeat 3 --dir /data/disk

Caches: SAM ViT-B @ 1024 ``image_embeddings`` (256x64x64: 2 MiB/image fp16, 1.02 MiB/image int8),
written by the real :class:`FeatureCacheWriter` (``write`` for the first batch of random features,
those stored rows then repeated over the file through h5py: the same bytes per image, written in
seconds). The loader is what training runs per cached teacher in its DataLoader workers
(``vfmkd.distillation.cached``): ``reader.will_need(id)`` for each image of a batch (the OS starts
reading its chunks: ``CachedTargetsDataset.__getitems__``; ``--no-hint`` leaves it out), then
``from_cache_entry(reader.read(id, dequantize=False))`` per image (int8 stays int8, the step
dequantises it), ``TeacherTargets.collate`` per batch of 8 (in a worker it stacks straight into shared
memory, as torch's ``default_collate`` does), images in a random order (the training sampler's), 0, 2
and 4 workers; timed from the first batch (worker start-up excluded) and scaled to the epoch.

Page cache: "cold" evicts the file's pages before the pass (``posix_fadvise(DONTNEED)`` after an
fsync: only this file, nothing else on the machine; ``--drop-caches`` drops the whole page cache
instead, root only); "warm" is the pass right after a full read. "ceiling": the same loop over one
image's targets held in memory (no disk): what the DataLoader's collation and worker transfer alone
deliver, the most any reader can reach with that many workers. Raw: ``dd bs=4M`` of the same file
to /dev/null, measured right before each loader pass in the same page-cache state (a busy machine
slows both alike); ``--repeat`` such pairs per row, medians (the raw row: every ``dd`` of that state).
Prints img/s and MB/s (bytes of the file per image), loader ÷ raw of each row (with its own ``dd``
rate: a host-cached "cold" file shows as a fast ``dd``) and a final ``RESULT`` line with every cold
ratio; the goal is >= 0.8 of raw cold.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, median, quiet  # noqa: E402
from benchmarks.bench_cache_storage import evict as evict_file  # noqa: E402  (fsync + posix_fadvise DONTNEED)
from vfmkd.cache.codec import dequantize  # noqa: E402
from vfmkd.cache.reader import FeatureCacheReader  # noqa: E402
from vfmkd.cache.writer import FeatureCacheWriter  # noqa: E402
from vfmkd.core.feature_spec import FeatureSpec  # noqa: E402
from vfmkd.core.fingerprint import TeacherFingerprint  # noqa: E402
from vfmkd.distillation.targets import QuantizedMap, TeacherTargets, from_cache_entry  # noqa: E402

SPEC = FeatureSpec("image_embeddings", 256, 16)
SIZE, BATCH, WRITE_BATCH = 1024, 8, 8
FINGERPRINT = TeacherFingerprint("sam", "vit_b", "random-init:seed0", SIZE, "float32", "sam-resize-longest-pad")
DROP = Path("/proc/sys/vm/drop_caches")


def write_cache(path: Path, n: int, storage: str) -> None:
    """A complete cache of ``n`` images: one real ``write`` of WRITE_BATCH random images, then their stored rows
    repeated (h5py) over the rest of the file."""
    ids = [f"{i:09d}" for i in range(n)]
    side = SIZE // SPEC.stride
    with FeatureCacheWriter(path, ids, FINGERPRINT, [SPEC], SIZE, teacher_config={"type": "sam"}, dataset="synthetic",
                            split="train", batch_size=WRITE_BATCH, storage=storage, teacher="sam",
                            extra_attrs={"compute": "synthetic"}) as w:
        feats = {SPEC.name: torch.randn(WRITE_BATCH, SPEC.channels, side, side)}
        affine = torch.tensor([[SIZE / 640, SIZE / 640, 0.0, 0.0]] * WRITE_BATCH)
        valid = torch.full((WRITE_BATCH, 2), float(SIZE))
        w.write(0, feats, affine, valid, np.full((WRITE_BATCH, 2), 640))
        f = w._file
        names = [n for n in f["features"]] + ["stats/image_embeddings/image_moments", "affine", "valid_hw", "orig_hw"]
        for name in (f"features/{n}" if not n.startswith(("stats", "affine", "valid", "orig")) else n for n in names):
            block = f[name][:WRITE_BATCH]
            for a in range(WRITE_BATCH, n, WRITE_BATCH):
                b = min(a + WRITE_BATCH, n)
                f[name][a:b] = block[:b - a]
        f["done"][:] = True
        w.finalize()


class CachedTargets(Dataset):
    """What CachedTargetsDataset does per cached teacher, without the image sample: a batch's reads are
    first hinted to the OS (``will_need``; ``hint=False``: without, to compare)."""

    def __init__(self, reader: FeatureCacheReader, hint: bool = True) -> None:
        self.reader, self.hint = reader, hint

    def __len__(self) -> int:
        return len(self.reader.image_ids)

    def __getitem__(self, i: int) -> TeacherTargets:
        return from_cache_entry(self.reader.read(self.reader.image_ids[i], dequantize=False))

    def __getitems__(self, indices: list[int]) -> list[TeacherTargets]:
        for i in indices if self.hint else ():
            self.reader.will_need(self.reader.image_ids[i])
        return [self[i] for i in indices]


class InMemory(Dataset):
    """The same per-image targets from memory (one image read once, returned ``n`` times): what the
    DataLoader itself (worker IPC, collation) delivers without any disk read, the loader's ceiling."""

    def __init__(self, reader: FeatureCacheReader) -> None:
        self.n, self.item = len(reader.image_ids), from_cache_entry(reader.read(reader.image_ids[0],
                                                                                dequantize=False))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> TeacherTargets:
        return self.item


def evict(path: Path, whole: bool) -> None:
    subprocess.run(["sync"], check=False)
    if whole:
        DROP.write_text("3\n")
    else:
        evict_file(path)


def raw_rate(path: Path) -> float:
    """Seconds to read the whole file with dd (4 MiB blocks) to /dev/null."""
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)
    return time.perf_counter() - t0


def loader_pass(path: Path, workers: int, seed: int, in_memory: bool = False, hint: bool = True) -> float:
    """Seconds for one epoch of the loader over the cache, random order (``in_memory``: the ceiling)."""
    reader = FeatureCacheReader(path)
    loader = DataLoader(InMemory(reader) if in_memory else CachedTargets(reader, hint), batch_size=BATCH, shuffle=True,
                        num_workers=workers, collate_fn=TeacherTargets.collate,
                        generator=torch.Generator().manual_seed(seed))
    batches = iter(loader)
    seen = len(next(batches).affine)  # workers started and primed: not the disk's time
    t0 = time.perf_counter()
    seen += sum(len(b.affine) for b in batches)
    dt = time.perf_counter() - t0
    assert seen == len(reader.image_ids)
    reader.close()
    return dt * len(reader.image_ids) / (len(reader.image_ids) - BATCH)  # per epoch at the steady rate


def _timed_collate(entries: list[TeacherTargets]) -> tuple[TeacherTargets, float, float]:
    """In a worker: ms of ``TeacherTargets.collate`` (stacks into shared memory there) and of the path it
    replaced: ``torch.stack`` into ordinary memory, then the copy into shared memory the worker's send makes."""
    t0 = time.perf_counter()
    batch = TeacherTargets.collate(entries)
    t1 = time.perf_counter()
    for name in entries[0].features:
        maps = [e.features[name] for e in entries]
        keys = ("values", "scale", "channel_scale") if isinstance(maps[0], QuantizedMap) else ()
        for part in [[getattr(m, k) for m in maps] for k in keys] or [maps]:
            torch.stack(part).share_memory_()
    return batch, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def stages(path: Path) -> str:
    """Per batch of BATCH images, warm page cache, medians (ms): the reads (and their finite-value check),
    the collation in a worker (shared memory vs the stack-then-share it replaced), and what the step's
    decode to float32 costs on the CPU in the main process vs decoding in the worker instead."""
    raw_rate(path)
    ids = FeatureCacheReader(path).image_ids
    readers = {check: FeatureCacheReader(path, check_finite=check) for check in (True, False)}
    reads: dict[bool, list[float]] = {True: [], False: []}
    for a in range(0, len(ids) - BATCH + 1, BATCH):  # with and without the check in turn, same images
        for check, reader in readers.items():
            t0 = time.perf_counter()
            items = [from_cache_entry(reader.read(i, dequantize=False)) for i in ids[a:a + BATCH]]
            reads[check].append((time.perf_counter() - t0) * 1e3)
    reader = FeatureCacheReader(path)
    timed = list(DataLoader(InMemory(reader), batch_size=BATCH, num_workers=1, collate_fn=_timed_collate))
    batch, cpu = TeacherTargets.collate(items), torch.device("cpu")
    fmap = batch.features[SPEC.name]
    main = median([_ms(lambda: batch.to_float(cpu)) for _ in range(5)])
    read, unchecked = median(reads[True]), median(reads[False])
    line = (f"read {read:.1f} (finite check {read - unchecked:.1f}) | collate in a worker: "
            f"shared memory {median([t[1] for t in timed]):.1f} vs stack + share {median([t[2] for t in timed]):.1f} | "
            f"decode to float32 in the main process {main:.1f}")
    if isinstance(fmap, QuantizedMap):
        worker = median([_ms(lambda: dequantize(fmap.values, fmap.scale, fmap.channel_scale)) for _ in range(5)])
        half = dequantize(fmap.values, fmap.scale, fmap.channel_scale)
        line += f" (decoding int8 in the worker instead: {worker:.1f} there + {_ms(lambda: half.float()):.1f} here)"
    return line


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def pair(path: Path, state: str, workers: int, whole: bool, seed: int, hint: bool) -> tuple[float, float]:
    """(raw dd seconds, loader seconds) measured back to back in the same page-cache state, so a shared
    machine's load hits both alike."""
    if state == "cold":
        evict(path, whole)
    else:
        raw_rate(path)  # the whole file in the page cache
    raw = raw_rate(path)
    if state == "cold":
        evict(path, whole)
    return raw, loader_pass(path, workers, seed=seed, hint=hint)


def measure(path: Path, storage: str, workers: list[int], whole: bool, repeat: int, hint: bool = True) -> list[dict]:
    """Ceiling rows, then per page-cache state and worker count ``repeat`` raw/loader pairs: the loader's
    median time and the median of the pairs' loader ÷ raw ratios."""
    n, size = len(FeatureCacheReader(path).image_ids), path.stat().st_size
    rows = []
    for w in workers:
        dt = median([loader_pass(path, w, seed=w, in_memory=True) for _ in range(repeat)])
        rows.append({"storage": storage, "state": "-", "what": f"ceiling {w} workers", "s": dt,
                     "mb_s": size / dt / 1e6, "img_s": n / dt})
    for state in ("cold", "warm"):
        loaders, raws = [], []
        for w in workers:
            pairs = [pair(path, state, w, whole, seed=w + 100 * r, hint=hint) for r in range(repeat)]
            raw, dt = median([r for r, _ in pairs]), median([d for _, d in pairs])
            raws += [r for r, _ in pairs]
            loaders.append({"storage": storage, "state": state, "what": f"loader {w} workers", "s": dt,
                            "mb_s": size / dt / 1e6, "img_s": n / dt, "workers": w,
                            "of_raw": median([r / d for r, d in pairs]), "raw_mb_s": size / raw / 1e6})
        raw = median(raws)  # every dd of this state
        rows += [{"storage": storage, "state": state, "what": "raw dd", "s": raw, "mb_s": size / raw / 1e6,
                  "img_s": n / raw}] + loaders
    return rows


def result_line(rows: list[dict], goal: float = 0.8) -> str:
    """One line with every cold loader ÷ raw ratio and whether each reaches ``goal``."""
    cold = [r for r in rows if r["state"] == "cold" and "of_raw" in r]
    parts, storages = [], list(dict.fromkeys(r["storage"] for r in cold))
    for st in storages:
        raw = next(r for r in rows if r["storage"] == st and r["state"] == "cold" and r["what"] == "raw dd")
        parts.append(f"{st} (raw {raw['mb_s']:.0f} MB/s) "
                     + " ".join(f"{r['workers']}w {r['of_raw']:.2f}" for r in cold if r["storage"] == st))
    below = [f"{r['storage']} {r['workers']}w" for r in cold if r["of_raw"] < goal]
    verdict = "met for all" if not below else "missed by " + ", ".join(below)
    return f"RESULT loader/raw cold (goal >= {goal}): " + "; ".join(parts) + f" -> goal {verdict}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--storages", nargs="+", default=["float16", "int8"])
    p.add_argument("--dir", type=Path, default=None, help="where the caches are written (the disk to measure)")
    p.add_argument("--drop-caches", action="store_true", help="cold = drop the whole page cache (root) instead of "
                                                              "evicting the file's pages")
    p.add_argument("--repeat", type=int, default=2, help="raw/loader pairs per row (medians; >= 3 on a busy machine)")
    p.add_argument("--no-hint", action="store_true", help="read without first hinting a batch's chunks to the OS "
                                                          "(FeatureCacheReader.will_need), to compare")
    p.add_argument("--stages", action="store_true", help="also time each per-batch step of the path (warm)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    quiet()
    warnings.filterwarnings("ignore", message=".*worker processes in total")  # 4 workers on 2 cores: on purpose
    torch.set_num_threads(1)
    print(machine())
    rows = []
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for storage in a.storages:
            path = Path(tmp) / f"{storage}.h5"
            write_cache(path, a.images, storage)
            mib = path.stat().st_size / 2**20
            print(f"SAM@1024 {storage}: {a.images} images, {mib:.0f} MiB ({mib / a.images:.2f} MiB/image), batch "
                  f"{BATCH}, random order")
            if a.stages:
                print(f"  stages, ms per batch of {BATCH}: {stages(path)}")
            got = measure(path, storage, a.workers, a.drop_caches, a.repeat, not a.no_hint)
            for r in got:
                ratio = f"  {r['of_raw']:.2f} of raw {r['state']} (its dd {r['raw_mb_s']:.0f} MB/s)" if "of_raw" in r \
                    else ""
                print(f"  {r['state']:4s} {r['what']:17s} {r['img_s']:8.1f} img/s {r['mb_s']:8.1f} MB/s{ratio}")
            rows += got
            path.unlink()
    print(result_line(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
