"""The filling loop: run a teacher over a split's images and write its cache, resumably, alone or as one
rank of several (each caches a shard, rank 0 indexes them, or joins them with ``join``).

The cache knows no teacher and no dataset: the loop is handed a :class:`CacheTeacher` (any
``vfmkd.teachers`` teacher), the split's image paths with the function that decodes one, and the
box prompts of its mask logits (:class:`BoxPrompts`, the caller reads them from the label files).
Batches are fixed ranges [k*B, (k+1)*B) of the sorted image list; a rerun recomputes only the
batches that hold an unfinished image, so the final file equals an uninterrupted run's.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from vfmkd.cache.codec import mirror_affine
from vfmkd.cache.shards import index_shards, index_world, merge_shards, shard_file, shard_range
from vfmkd.cache.writer import FeatureCacheWriter, MaskPlan
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.fingerprint import TeacherFingerprint

LOG = logging.getLogger("vfmkd")

#: decodes one image file to an (H, W, 3) uint8 RGB array (the datasets' ``load_rgb``)
ImageLoader = Callable[[Path], np.ndarray]


class CacheTeacher(Protocol):
    """What the loop asks of a teacher (``vfmkd.teachers.base.BaseTeacher`` provides it):
    ``extract_features(images) -> ({name: (B, C, h, w)}, batch with .affine (B, 4) and .valid_hw (B, 2))``
    and, for mask logits, ``mask_logits(features, boxes (M, 4), batch_idx (M,)) -> (M, S/4, S/4)``."""

    input_size: int
    primary_feature: Optional[str]
    device: Any

    def feature_specs(self) -> Sequence[FeatureSpec]: ...

    def fingerprint(self) -> TeacherFingerprint: ...

    def extract_features(self, images: Sequence[np.ndarray]) -> Tuple[Dict[str, torch.Tensor], Any]: ...

    def mask_logits(self, features: Dict[str, torch.Tensor], boxes: torch.Tensor,
                    batch_idx: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class FillSettings:
    """How a cache is written (the cache tool's flags); every file written records them.

    ``teacher``: the teacher's name (``--teacher``); ``teacher_config``: its resolved entry, stored for
    the rebuild command; ``data_root``: "" for the dataset's default root; ``features``: the maps to
    cache (None: the primary one; ``("all",)``: every one); ``compression``: None or an HDF5 filter."""

    teacher: str
    teacher_config: Mapping[str, Any]
    dataset: str
    data_root: str
    batch_size: int
    features: Optional[Tuple[str, ...]] = None
    compression: Optional[str] = None
    storage: str = "float16"
    with_flip: bool = False
    progress: bool = True
    join: bool = False  # sharded runs: copy the shards into one file instead of indexing them (shards.py)


@dataclass(frozen=True)
class BoxPrompts:
    """The mask prompts of a split: per image the (K, 5) ``class cx cy w h`` label rows (row j is
    label_index j) and the :class:`MaskPlan` that describes them."""

    rows: Tuple[np.ndarray, ...]
    plan: MaskPlan

    def part(self, start: int, stop: int) -> BoxPrompts:
        """The prompts of images [start, stop) (a shard), same source and labels hash."""
        return BoxPrompts(self.rows[start:stop], MaskPlan(self.plan.cls[start:stop], self.plan.prompt_source,
                                                          self.plan.labels_sha256, self.plan.num_classes))


def selected_specs(teacher: CacheTeacher, names: Optional[Sequence[str]]) -> Tuple[FeatureSpec, ...]:
    """The teacher's FeatureSpecs, restricted to ``names`` (--features) when given."""
    specs = tuple(teacher.feature_specs())
    if not names:
        return tuple(s for s in specs if s.name == teacher.primary_feature) or specs
    if list(names) == ["all"]:
        return specs
    known = [s.name for s in specs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--features {' '.join(unknown)}: this teacher returns {', '.join(known)}")
    return tuple(s for s in specs if s.name in names)


def mirrored(images: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Horizontally mirrored copies (pixel x' = W - x)."""
    return [np.ascontiguousarray(im[:, ::-1]) for im in images]


def run_teacher(
    teacher: CacheTeacher, images: Sequence[np.ndarray], with_flip: bool
) -> Tuple[Dict[str, torch.Tensor], Any, Optional[tuple]]:
    """(features, TeacherBatch) of the images and, with the flip pass, (features, affine for ORIGINAL
    pixels, valid_hw) of the teacher on their mirrored copies."""
    feats, geo = teacher.extract_features(images)
    if not with_flip:
        return feats, geo, None
    flip_feats, flip_geo = teacher.extract_features(mirrored(images))
    return feats, geo, (flip_feats, mirror_affine(flip_geo.affine, [im.shape[1] for im in images]), flip_geo.valid_hw)


def prompt_boxes(rows: np.ndarray, hw: Tuple[int, int], affine: torch.Tensor) -> torch.Tensor:
    """Label rows (K, 5) ``class cx cy w h`` normalised to the original image of size ``hw`` -> (K, 4)
    float32 x1, y1, x2, y2 teacher pixels by ``affine`` (sx, sy, ox, oy) (original px -> teacher px;
    sx < 0 for a mirrored pass: the corners are re-ordered)."""
    h, w = hw
    sx, sy, ox, oy = (float(v) for v in affine.tolist())
    r = np.asarray(rows, np.float64).reshape(-1, 5)
    xa, xb = (r[:, 1] - r[:, 3] / 2) * w * sx + ox, (r[:, 1] + r[:, 3] / 2) * w * sx + ox
    ya, yb = (r[:, 2] - r[:, 4] / 2) * h * sy + oy, (r[:, 2] + r[:, 4] / 2) * h * sy + oy
    out = np.stack([np.minimum(xa, xb), np.minimum(ya, yb), np.maximum(xa, xb), np.maximum(ya, yb)], axis=1)
    return torch.from_numpy(out.astype(np.float32))


def run_masks(teacher: CacheTeacher, images: Sequence[np.ndarray], rows: Sequence[np.ndarray],
              feats: Dict[str, torch.Tensor], affine: torch.Tensor,
              flip: Optional[tuple]) -> Dict[bool, Tuple[torch.Tensor, torch.Tensor]]:
    """{flipped: (logits (M, S/4, S/4), boxes (M, 4))} of the images' label boxes, image-major, in each
    pass (the flip pass is prompted with the mirrored boxes: its affine maps ORIGINAL pixels)."""
    batch_idx = torch.cat([torch.full((len(r),), i, dtype=torch.int64) for i, r in enumerate(rows)])
    out = {}
    for flipped, fs, aff in [(False, feats, affine)] + ([(True, flip[0], flip[1])] if flip is not None else []):
        boxes = torch.cat([prompt_boxes(r, im.shape[:2], aff[i]) for i, (r, im) in enumerate(zip(rows, images))])
        out[flipped] = (teacher.mask_logits(fs, boxes, batch_idx).float().cpu(), boxes)
    return out


def open_writer(settings: FillSettings, teacher: CacheTeacher, split: str, path: Path, paths: Sequence[Path],
                compute: str, prompts: Optional[BoxPrompts] = None) -> FeatureCacheWriter:
    """The writer of ``path`` (created, or reopened to resume) for the images ``paths``."""
    return FeatureCacheWriter(
        path, [p.stem for p in paths], teacher.fingerprint(), selected_specs(teacher, settings.features),
        teacher.input_size,
        teacher_config=settings.teacher_config, dataset=settings.dataset, split=split,
        batch_size=settings.batch_size, teacher=settings.teacher, data_root=settings.data_root,
        compression=settings.compression, storage=settings.storage, with_flip=settings.with_flip,
        extra_attrs={"compute": compute}, masks=None if prompts is None else prompts.plan,
    )


def fill_file(settings: FillSettings, teacher: CacheTeacher, writer: FeatureCacheWriter, paths: Sequence[Path],
              load: ImageLoader, split: str, compute: str, finalize: bool = True,
              prompts: Optional[BoxPrompts] = None) -> Tuple[int, Any]:
    """Compute the missing batches of ``paths`` (a whole split, or one rank's shard) into ``writer``;
    returns (images written, statistics or None)."""
    out_file = writer.path
    b = writer.batch_size
    if b != settings.batch_size:
        LOG.warning("%s was started with --batch-size %d (asked %d): resuming with %d so batches match",
                    out_file, b, settings.batch_size, b)
    if writer.attrs.get("compute", compute) != compute:  # other threads/device: last-bit fp16 differences
        LOG.warning("%s was started on %s, resuming on %s: recomputed batches may differ from an uninterrupted "
                    "run in the last fp16 bit", out_file, writer.attrs["compute"], compute)
    missing = set(writer.missing().tolist())
    pending = [k for k in range(math.ceil(len(paths) / b)) if missing.intersection(range(k * b, (k + 1) * b))]
    written = 0
    for k in tqdm(pending, desc=f"{split} batches", unit="batch", disable=not settings.progress):
        images = [load(p) for p in paths[k * b:(k + 1) * b]]
        feats, geo, flip = run_teacher(teacher, images, settings.with_flip)
        masks = None if prompts is None else run_masks(teacher, images, prompts.rows[k * b:(k + 1) * b], feats,
                                                       geo.affine, flip)
        # positional on purpose: tests wrap write() as (self, start, *args)
        writer.write(k * b, feats, geo.affine, geo.valid_hw, np.array([im.shape[:2] for im in images]), flip, masks)
        written += len(images)
    return written, writer.finalize() if finalize else None


def fill_shards(settings: FillSettings, teacher: CacheTeacher, split: str, out_file: Path, paths: Sequence[Path],
                load: ImageLoader, compute: str, rank: int, world: int, shards: int,
                prompts: Optional[BoxPrompts] = None) -> Tuple[int, Any]:
    """Rank ``rank`` of ``world`` caches shards rank, rank + world, ... of the ``shards`` contiguous blocks
    of batches, each into its shard file; after a barrier rank 0 indexes the shards as ``out_file`` (or
    joins them into it with ``settings.join``). Returns (images written by all ranks, statistics on rank 0)."""
    written = 0
    for r in range(rank, shards, world):
        start, stop = shard_range(len(paths), settings.batch_size, r, shards)
        if stop <= start:
            continue
        shard = shard_file(out_file, r, shards)
        LOG.info("rank %d/%d: images %d..%d -> %s", rank, world, start, stop - 1, shard)
        part = None if prompts is None else prompts.part(start, stop)
        with open_writer(settings, teacher, split, shard, paths[start:stop], compute, part) as writer:
            if writer.batch_size != settings.batch_size:
                raise ConfigError(f"{shard} was started with --batch-size {writer.batch_size}: shards follow the batch "
                                  f"ranges, rerun with --batch-size {writer.batch_size}")
            written += fill_file(settings, teacher, writer, paths[start:stop], load, split, compute,
                                 finalize=False, prompts=part)[0]
    total = written
    if world > 1:
        import torch.distributed as tdist

        device = teacher.device if tdist.get_backend() == "nccl" else "cpu"
        counts = torch.tensor([written], dtype=torch.int64, device=device)
        tdist.all_reduce(counts)  # also the barrier: every shard is finished after this
        total = int(counts.item())
    if rank != 0:
        return written, None
    t0, ids = time.perf_counter(), [p.stem for p in paths]
    if settings.join:
        stats = merge_shards(out_file, ids, settings.batch_size, shards,
                             lambda path: open_writer(settings, teacher, split, path, paths, compute, prompts))
    else:
        stats = index_shards(out_file, ids, settings.batch_size, shards)
    LOG.info("%s: %s %d shards as %s in %.2f s", split, "joined" if settings.join else "indexed", shards, out_file,
             time.perf_counter() - t0)
    return total, stats


def fill_cache(settings: FillSettings, teacher: CacheTeacher, split: str, out_file: Path, paths: Sequence[Path],
               load: ImageLoader, compute: str, prompts: Optional[BoxPrompts] = None,
               dist: Optional[Tuple[int, int]] = None) -> Optional[Tuple[int, Any]]:
    """Compute the missing batches of one split's ``out_file``: (images written, statistics or None),
    or None on a rank that has nothing to report. ``dist`` = (rank, world size) under torchrun: each
    rank caches its shard, then rank 0 indexes them as the split's file (or joins them, ``settings.join``).
    A split file that is a shard index is resumed shard by shard by the ranks there are (one process: all
    of them in turn); a file started by a single process is resumed by rank 0 alone (one file cannot take
    several writers)."""
    rank, world = dist or (0, 1)
    indexed = index_world(out_file)
    shards_exist = any(shard_file(out_file, r, world).exists() for r in range(world))
    if indexed or (world > 1 and (shards_exist or not out_file.exists())):
        written, stats = fill_shards(settings, teacher, split, out_file, paths, load, compute, rank, world,
                                     indexed or world, prompts)
        return None if rank != 0 else (written, stats)
    if world > 1:
        if rank != 0:
            LOG.info("rank %d: %s exists (not sharded): rank 0 resumes it alone", rank, out_file)
            return None
        LOG.warning("%s was started by a single process: rank 0 resumes it alone, the other ranks idle", out_file)
    with open_writer(settings, teacher, split, out_file, paths, compute, prompts) as writer:
        return fill_file(settings, teacher, writer, paths, load, split, compute, prompts=prompts)
