#!/usr/bin/env python
"""Run a frozen teacher once over a dataset split and cache its features (HDF5) for training.

    python tools/prepare_teacher_features.py --teacher sam --dataset coco128 --splits train2017 val2017 \\
        --output teacher_features/sam/ teacher.variant=vit_b teacher.input_size=1024 [--storage int8] [--with-flip]

Resumable: batches are fixed ranges [k*B, (k+1)*B) of the sorted image list; a rerun recomputes only
the batches that hold an unfinished image, so the final file equals an uninterrupted run's. When every
image is done, the per-channel mean/std of every feature (over valid cells) are stored with the cache;
a rerun of a finished cache adds them to files written before statistics existed.

Mask logits (``--outputs features,masks``; teachers that can segment: SAM, LoRA-SAM, SAM2): every
image's detection-label boxes (``object_detection/labels/<split>/<id>.txt``, rows as
``parse_labels`` returns them, row j = ``label_index`` j) are mapped to teacher pixels by the pass's
affine and prompted one by one (``teacher.mask_logits``); the (K, S/4, S/4) logits are stored with
the boxes, label rows and classes, in the plain pass and, with ``--with-flip``, the flip pass (boxes
mirrored), in --storage (float16, or int8 with a float32 scale per mask). The sha256 of the label
files is recorded: a training run refuses the masks once the labels changed. Rerunning a
features-only cache with ``--outputs features,masks`` adds the masks to it (resumably).

Sharded: ``torchrun --nproc_per_node N tools/prepare_teacher_features.py ...`` (gloo on CPU, nccl with a
cuda teacher, rank r on cuda:LOCAL_RANK): each rank caches a contiguous block of batches into
``<split>.shard<r>of<N>.h5`` (resumable per shard), then rank 0 joins them into ``<split>.h5``
(vfmkd/cache/shards.py): bit-identical to a single-process cache at equal torch thread counts.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

import vfmkd.distillation.vfmkd_model_teacher  # noqa: E402,F401  (registers the vfmkd teacher, to refuse it by name)
import vfmkd.teachers  # noqa: E402,F401  (registers the teachers)
from vfmkd.cache.codec import STORAGES, bytes_per_image, mask_bytes, mirror_affine  # noqa: E402
from vfmkd.cache.format import OUTPUTS, cache_file, label_files_sha256  # noqa: E402
from vfmkd.cache.reader import FeatureCacheReader  # noqa: E402
from vfmkd.cache.shards import merge_shards, shard_file, shard_range  # noqa: E402
from vfmkd.cache.writer import FeatureCacheWriter, MaskPlan  # noqa: E402
from vfmkd.core.config import (  # noqa: E402
    import_custom_modules,
    parse_overrides,
    read_yaml,
    resolve_component,
    resolve_path,
    teacher_kwargs,
)
from vfmkd.core.errors import ConfigError, DatasetError  # noqa: E402
from vfmkd.core.registry import TEACHERS  # noqa: E402
from vfmkd.datasets.coco_yolo import check_images, list_images, load_rgb, parse_labels  # noqa: E402
from vfmkd.engine.training.distributed import init_distributed  # noqa: E402
from vfmkd.teachers.base import segmenting_teachers  # noqa: E402
from vfmkd.utils.cli import entry  # noqa: E402
from vfmkd.utils.logging import setup_logging  # noqa: E402
from vfmkd.utils.stop_signals import Stopped, rerun_command  # noqa: E402

LOG = logging.getLogger("vfmkd")
MIN_COSINE = 0.999


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="sam",
                   help="teacher name: reads configs/teachers/<teacher>.yaml (its defaults)")
    p.add_argument(
        "--teacher-config", metavar="PATH", help="teacher YAML to use instead of configs/teachers/<teacher>.yaml"
    )
    p.add_argument("--dataset", default="coco128", help="dataset name; its root is datasets/<dataset> unless "
                                                        "--data-root")
    p.add_argument("--data-root", metavar="DIR", help="dataset root holding images/<split>/; None: datasets/<dataset>")
    p.add_argument("--splits", nargs="+", default=["train2017"], help="splits to cache, one <split>.h5 each")
    p.add_argument("--output", metavar="DIR", help="cache folder, one <split>.h5 per split; None: "
                                                   "teacher_features/<teacher>/")
    p.add_argument("--features", type=lambda v: [n for n in v.split(",") if n], metavar="NAME[,NAME]",
                   help="comma-separated teacher features to cache (SAM: trunk,image_embeddings), or 'all'; None: the "
                        "teacher's primary feature (SAM: image_embeddings, 2 MiB/image at 1024; 'all' adds the 6 MiB "
                        "trunk)")
    p.add_argument(
        "--batch-size", type=int, default=4, help="images per teacher forward; a resumed file keeps its first value"
    )
    p.add_argument("--limit", type=int, help="only the first N images of each split (keep it when resuming)")
    p.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="N",
        help=f"afterwards recompute N random cached images and compare; exit 1 if mean cosine < {MIN_COSINE}",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="seeds torch (teacher.init=random weights) and the --verify pick")
    p.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none",
                   help="HDF5 filter (+shuffle) for features: gzip saves ~30-40%% but reads ~5x slower and a kill "
                        "mid-write can corrupt the file; 'none' preallocates and is crash-safe")
    p.add_argument("--storage", choices=STORAGES, default="float16",
                   help="feature values: float16 (2 B/value), or int8 with float32 scales per spatial cell and per "
                        "channel (1 B/value + 4 B/cell + 4 B/channel: SAM 256x64x64 1.02 MiB instead of 2 MiB; cosine "
                        "to fp16 > 0.9999, ~1%% of a channel's std after standardisation); the reader returns float16 "
                        "either way")
    p.add_argument("--with-flip", action="store_true",
                   help="also run the teacher on the horizontally mirrored image (ViT features are not "
                        "flip-equivariant) and store that pass for flip augmentation: twice the compute and the bytes")
    p.add_argument("--outputs", type=lambda v: [n for n in v.split(",") if n], default=["features"],
                   metavar="OUT[,OUT]",
                   help="what to cache: features, or features,masks (also the teacher's mask logits prompted with "
                        "every detection-label box of each image; SAM, LoRA-SAM, SAM2)")
    p.add_argument("--num-classes", type=int, default=80,
                   help="detection classes of the dataset (label files are checked against it; --outputs masks)")
    p.add_argument("--custom-imports", type=lambda v: [m for m in v.split(",") if m], default=[], metavar="MOD[,MOD]",
                   help="modules to import first, e.g. my_pkg.my_teacher: your own @TEACHERS.register(...) teachers")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    p.add_argument("overrides", nargs="*", metavar="teacher.key=value",
                   help="teacher kwargs over the YAML, e.g. teacher.variant=vit_l teacher.input_size=512 "
                        "teacher.init=random")
    return p


def resolve_teacher(args: argparse.Namespace) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(resolved teacher entry, constructor kwargs) from the YAML plus ``teacher.*`` overrides."""
    path = args.teacher_config or f"configs/teachers/{args.teacher}.yaml"
    if args.teacher_config or resolve_path(path).is_file():
        base = read_yaml(path)
    else:
        LOG.info("no %s: using the registered teacher '%s' with its defaults", path, args.teacher)
        base = {}
    base.setdefault("type", args.teacher)
    over = OmegaConf.to_container(parse_overrides(args.overrides))
    assert isinstance(over, dict)
    bad = [f"{k}=..." for k in over if k != "teacher"]
    if bad or not isinstance(over.get("teacher", {}), dict):
        raise ConfigError(
            f"overrides must be teacher kwargs like teacher.input_size=512, got {' '.join(bad or args.overrides)}; "
            "dataset and output are flags (--dataset, --output, ...), see --help"
        )
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(over.get("teacher", {}))))
    assert isinstance(merged, dict)
    resolved = resolve_component(merged, "teacher")
    kwargs = teacher_kwargs(resolved)
    TEACHERS.check_kwargs(resolved["type"], kwargs, where=f"teacher '{args.teacher}'")
    return resolved, kwargs


def selected_specs(teacher: Any, names: Optional[Sequence[str]]) -> Tuple[Any, ...]:
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
    teacher: Any, images: Sequence[np.ndarray], with_flip: bool
) -> Tuple[Dict[str, torch.Tensor], Any, Optional[tuple]]:
    """(features, TeacherBatch) of the images and, with the flip pass, (features, affine for ORIGINAL
    pixels, valid_hw) of the teacher on their mirrored copies."""
    feats, geo = teacher.extract_features(images)
    if not with_flip:
        return feats, geo, None
    flip_feats, flip_geo = teacher.extract_features(mirrored(images))
    return feats, geo, (flip_feats, mirror_affine(flip_geo.affine, [im.shape[1] for im in images]), flip_geo.valid_hw)


def label_dir(root: Path, split: str) -> Path:
    """Where the detection labels of ``split`` live (as DetectionDataset reads them)."""
    return Path(root) / "object_detection" / "labels" / split


class Prompts:
    """The mask prompts of a split: per image the (K, 5) ``class cx cy w h`` rows of its label file
    (``parse_labels``; row j is label_index j) and the :class:`MaskPlan` that describes them."""

    def __init__(self, root: Path, split: str, paths: Sequence[Path], num_classes: int,
                 rows: Optional[List[np.ndarray]] = None, plan: Optional[MaskPlan] = None) -> None:
        folder = label_dir(root, split)
        ids = [p.stem for p in paths]
        self.rows = (
            rows if rows is not None else [parse_labels(folder / f"{i}.txt", num_classes, "--num-classes") for i in ids]
        )
        try:
            rel = folder.resolve().relative_to(Path(root).resolve())
        except ValueError:
            rel = folder
        self.plan = plan or MaskPlan(cls=tuple(r[:, 0].astype(np.int64) for r in self.rows),
                                     prompt_source=f"detection-labels:{rel.as_posix()}",
                                     labels_sha256=label_files_sha256(folder, ids), num_classes=num_classes)

    def part(self, start: int, stop: int) -> Prompts:
        """The prompts of images [start, stop) (a shard), same source and labels hash."""
        sub = Prompts.__new__(Prompts)
        sub.rows = self.rows[start:stop]
        sub.plan = MaskPlan(self.plan.cls[start:stop], self.plan.prompt_source, self.plan.labels_sha256,
                            self.plan.num_classes)
        return sub


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


def run_masks(teacher: Any, images: Sequence[np.ndarray], rows: Sequence[np.ndarray], feats: Dict[str, torch.Tensor],
              affine: torch.Tensor, flip: Optional[tuple]) -> Dict[bool, Tuple[torch.Tensor, torch.Tensor]]:
    """{flipped: (logits (M, S/4, S/4), boxes (M, 4))} of the images' label boxes, image-major, in each
    pass (the flip pass is prompted with the mirrored boxes: its affine maps ORIGINAL pixels)."""
    batch_idx = torch.cat([torch.full((len(r),), i, dtype=torch.int64) for i, r in enumerate(rows)])
    out = {}
    for flipped, fs, aff in [(False, feats, affine)] + ([(True, flip[0], flip[1])] if flip is not None else []):
        boxes = torch.cat([prompt_boxes(r, im.shape[:2], aff[i]) for i, (r, im) in enumerate(zip(rows, images))])
        out[flipped] = (teacher.mask_logits(fs, boxes, batch_idx).float().cpu(), boxes)
    return out


def check_outputs(outputs: Sequence[str], teacher_type: str, teacher_cls: Any) -> bool:
    """Validate the teacher and ``--outputs``; True when mask logits are asked for."""
    if getattr(teacher_cls, "live_only", False):
        raise ConfigError(f"the {teacher_type} teacher is live only (it runs on the student's own canvas): nothing to "
                          f"cache; use it with teachers.<name>.offline=false")
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or "features" not in outputs:
        raise ConfigError(f"--outputs {','.join(outputs)}: choose features or features,masks (features are always "
                          "cached)")
    if "masks" in outputs and not getattr(teacher_cls, "can_segment", False):
        raise ConfigError(f"--outputs masks: the {teacher_type} teacher cannot be prompted for mask logits; teachers "
                          f"that can: {', '.join(segmenting_teachers())}.")
    return "masks" in outputs


def _writer(args: argparse.Namespace, teacher: Any, entry: Dict[str, Any], split: str, path: Path,
            paths: Sequence[Path],
            compute: str, prompts: Optional[Prompts] = None) -> FeatureCacheWriter:
    return FeatureCacheWriter(
        path, [p.stem for p in paths], teacher.fingerprint(), selected_specs(teacher, args.features),
        teacher.input_size,
        teacher_config=entry, dataset=args.dataset, split=split, batch_size=args.batch_size, teacher=args.teacher,
        data_root=args.data_root or "", compression=None if args.compression == "none" else args.compression,
        storage=args.storage, with_flip=args.with_flip, extra_attrs={"compute": compute},
        masks=None if prompts is None else prompts.plan,
    )


def fill_file(args: argparse.Namespace, teacher: Any, writer: FeatureCacheWriter, paths: Sequence[Path], split: str,
              compute: str, finalize: bool = True, prompts: Optional[Prompts] = None) -> Tuple[int, Any]:
    """Compute the missing batches of ``paths`` (a whole split, or one rank's shard) into ``writer``;
    returns (images written, statistics or None)."""
    out_file = writer.path
    b = writer.batch_size
    if b != args.batch_size:
        LOG.warning("%s was started with --batch-size %d (asked %d): resuming with %d so batches match",
                    out_file, b, args.batch_size, b)
    if writer.attrs.get("compute", compute) != compute:  # other threads/device: last-bit fp16 differences
        LOG.warning("%s was started on %s, resuming on %s: recomputed batches may differ from an uninterrupted "
                    "run in the last fp16 bit", out_file, writer.attrs["compute"], compute)
    missing = set(writer.missing().tolist())
    pending = [k for k in range(math.ceil(len(paths) / b)) if missing.intersection(range(k * b, (k + 1) * b))]
    written = 0
    for k in tqdm(pending, desc=f"{split} batches", unit="batch", disable=args.no_progress):
        images = [load_rgb(p) for p in paths[k * b:(k + 1) * b]]
        feats, geo, flip = run_teacher(teacher, images, args.with_flip)
        masks = None if prompts is None else run_masks(teacher, images, prompts.rows[k * b:(k + 1) * b], feats,
                                                       geo.affine, flip)
        # positional on purpose: tests wrap write() as (self, start, *args)
        writer.write(k * b, feats, geo.affine, geo.valid_hw, np.array([im.shape[:2] for im in images]), flip, masks)
        written += len(images)
    return written, writer.finalize() if finalize else None


def fill_split(args: argparse.Namespace, teacher: Any, entry: Dict[str, Any], root: Path, split: str, output: Path,
               dist: Optional[Tuple[int, int]] = None) -> Tuple[Path, List[Path]]:
    """Compute the missing batches of one split; returns the cache file and the cached image paths.
    ``dist`` = (rank, world size) under torchrun: each rank caches its shard (cache_shards.py), then rank 0
    joins them into the split's file."""
    paths, _, skipped = check_images(list_images(root, split, args.limit), split)
    if not paths:
        raise DatasetError(f"none of the images in {root / 'images' / split} can be decoded; nothing to cache")
    out_file = cache_file(output, split)
    LOG.info("%s: %d images -> %s", split, len(paths), out_file)
    specs = selected_specs(teacher, args.features)
    compute = f"{teacher.device} torch_threads={torch.get_num_threads()}"
    prompts = Prompts(root, split, paths, args.num_classes) if "masks" in args.outputs else None
    rank, world = dist or (0, 1)
    shards_exist = any(shard_file(out_file, r, world).exists() for r in range(world))
    if world > 1 and (shards_exist or not out_file.exists()):
        written, stats = fill_shard(args, teacher, entry, split, out_file, paths, compute, rank, world, prompts)
        if rank != 0:
            return out_file, paths
        cached = len(paths) - written
    else:
        if world > 1:  # a cache started by a single process: one file cannot take several writers
            if rank != 0:
                LOG.info("rank %d: %s exists (not sharded): rank 0 resumes it alone", rank, out_file)
                return out_file, paths
            LOG.warning("%s was started by a single process: rank 0 resumes it alone, the other ranks idle", out_file)
        with _writer(args, teacher, entry, split, out_file, paths, compute, prompts) as writer:
            written, stats = fill_file(args, teacher, writer, paths, split, compute, prompts=prompts)
        cached = len(paths) - written
    feat_bytes, other_bytes = bytes_per_image(specs, teacher.input_size, args.storage, args.with_flip)
    for name, (mean, std) in (stats or {}).items():
        LOG.info("%s stats: %s per-channel mean in [%.3g, %.3g], std in [%.3g, %.3g] (stored as stats/%s/{mean,std})",
                 split, name, mean.min(), mean.max(), std.min(), std.max(), name)
    size = out_file.stat().st_size
    side = {s.name: teacher.input_size // s.stride for s in specs}
    held = " + ".join(f"{s.name} {s.channels}x{side[s.name]}x{side[s.name]}" for s in specs)
    storage = "int8 + float32 cell and channel scales" if args.storage == "int8" else "float16"
    print(
        f"{split}: {written} images written, {cached} already cached, {len(skipped)} skipped "
        f"(undecodable); storage {args.storage}{', with flip pass' if args.with_flip else ''}: "
        f"{feat_bytes + other_bytes} bytes per cached image ({feat_bytes / 2**20:.4f} MiB features: {held} {storage}"
        f"{' x2 passes' if args.with_flip else ''}; {other_bytes} B geometry + statistics); "
        f"file {size / 2**20:.1f} MiB = {size / len(paths):.0f} B/image"
        f"{'' if stats else ' (statistics pending: cache unfinished)'} -> {out_file}"
    )
    if prompts is not None:
        count = int(prompts.plan.offsets[-1])
        per_mask = mask_bytes(args.storage, teacher.input_size // 4, args.with_flip)
        side = teacher.input_size // 4
        print(
            f"{split}: mask logits of {count} label boxes ({count / len(paths):.2f} per image, "
            f"{prompts.plan.prompt_source}): {per_mask} bytes per mask ({side}x{side} "
            f"{args.storage}{' + float32 scale' if args.storage == 'int8' else ''}"
            f"{' x2 passes' if args.with_flip else ''} + box, label row, class) = {per_mask * count / len(paths):.0f} "
            f"bytes per cached image"
        )
    return out_file, paths


def fill_shard(args: argparse.Namespace, teacher: Any, entry: Dict[str, Any], split: str, out_file: Path,
               paths: Sequence[Path], compute: str, rank: int, world: int,
               prompts: Optional[Prompts] = None) -> Tuple[int, Any]:
    """Rank ``rank`` caches its contiguous block of batches into its shard file; after a barrier rank 0
    joins the shards into ``out_file``. Returns (images written by all ranks, statistics on rank 0)."""
    import torch.distributed as tdist

    start, stop = shard_range(len(paths), args.batch_size, rank, world)
    written = 0
    if stop > start:
        shard = shard_file(out_file, rank, world)
        LOG.info("rank %d/%d: images %d..%d -> %s", rank, world, start, stop - 1, shard)
        part = None if prompts is None else prompts.part(start, stop)
        with _writer(args, teacher, entry, split, shard, paths[start:stop], compute, part) as writer:
            if writer.batch_size != args.batch_size:
                raise ConfigError(f"{shard} was started with --batch-size {writer.batch_size}: shards follow the batch "
                                  f"ranges, rerun with --batch-size {writer.batch_size}")
            written, _ = fill_file(args, teacher, writer, paths[start:stop], split, compute, finalize=False,
                                   prompts=part)
    counts = torch.tensor([written], dtype=torch.int64, device=teacher.device if tdist.get_backend() == "nccl" else
                          "cpu")
    tdist.all_reduce(counts)  # also the barrier: every shard is finished after this
    if rank != 0:
        return written, None
    LOG.info("%s: joining %d shards into %s", split, world, out_file)
    t0 = time.perf_counter()
    stats = merge_shards(out_file, [p.stem for p in paths], args.batch_size, world,
                         lambda path: _writer(args, teacher, entry, split, path, paths, compute, prompts))
    LOG.info("%s: joined %d shards into %s in %.2f s", split, world, out_file, time.perf_counter() - t0)
    return int(counts.item()), stats


def compare(label: str, live: torch.Tensor, cached: torch.Tensor) -> bool:
    """Print cosine / max abs / relative L2 error of cached vs live (n, C, h, w); True if cosine passes."""
    a, c = live.float(), cached.float()
    cos = F.cosine_similarity(a, c, dim=1, eps=1e-12).mean().item()  # per location, over channels
    err = (a - c).abs().max().item()
    rel = ((a - c).norm() / a.norm().clamp_min(1e-12)).item()
    print(f"  {label}: mean cosine {cos:.6f}  max abs err {err:.3g}  rel L2 err {rel:.3g}"
          f"{'' if cos >= MIN_COSINE else f'  < {MIN_COSINE}: cache does not match this teacher'}")
    return cos >= MIN_COSINE


def verify(teacher: Any, out_file: Path, paths: Sequence[Path], n: int, seed: int, batch_size: int) -> bool:
    """Recompute ``n`` random cached images (and their mirrored copies for a flip pass) and print
    cosine / max abs / relative L2 error per feature and pass."""
    reader = FeatureCacheReader(out_file)
    done = [i for i in reader.image_ids if not reader.missing_ids([i])]
    pick = sorted(np.random.default_rng(seed).choice(len(done), size=min(n, len(done)), replace=False).tolist())
    ids = [done[i] for i in pick]
    if not ids:
        print(f"verify {out_file.name}: no cached images to verify")
        return False
    path_of = {p.stem: p for p in paths}
    passes = [False, True] if reader.has_flip else [False]
    live: Dict[bool, Dict[str, List[torch.Tensor]]] = {f: {} for f in passes}
    live_affine: Dict[bool, List[torch.Tensor]] = {f: [] for f in passes}
    for s in range(0, len(ids), batch_size):
        feats, geo, flip = run_teacher(teacher, [load_rgb(path_of[i]) for i in ids[s:s + batch_size]], reader.has_flip)
        for flipped, (fs, affine) in zip(passes, [(feats, geo.affine)] + ([flip[:2]] if flip else [])):
            for name, t in fs.items():
                live[flipped].setdefault(name, []).append(t.float().cpu())
            live_affine[flipped].append(affine.float().cpu())
    ok = True
    print(f"verify {out_file.name} (storage {reader.storage}): {len(ids)} images ({', '.join(ids)})")
    for flipped in passes:
        cached = [reader.read(i, flipped=flipped) for i in ids]
        tag = " (flip pass)" if flipped else ""
        same = torch.allclose(torch.cat(live_affine[flipped]), torch.stack([c["affine"] for c in cached]))
        ok &= same
        print(f"  affine{tag} {'matches' if same else 'DIFFERS'}")
        for spec in reader.feature_specs:
            ok &= compare(spec.name + tag, torch.cat(live[flipped][spec.name]),
                          torch.stack([x["features"][spec.name] for x in cached]))
    reader.close()
    return ok


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line. ``--splits`` takes one or more names, so argparse would swallow the
    ``key=value`` overrides that follow it (``--splits a b teacher.x=1``): a token with '=' is never a
    split name, so those go back to the overrides, in command-line order."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(tokens)
    moved = [t for t in args.splits if "=" in t]
    if moved:
        args.splits = [t for t in args.splits if "=" not in t]
        if not args.splits:
            raise ConfigError(f"--splits needs at least one split name before the overrides ({' '.join(moved)}), "
                              "e.g. --splits train2017 val2017")
        pool = set(moved) | set(args.overrides)
        args.overrides = [t for t in tokens if t in pool]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or args.verify < 0:
        raise ConfigError("--batch-size and --limit must be >= 1, --verify >= 0")
    setup_logging()
    import_custom_modules(args.custom_imports)
    entry_cfg, kwargs = resolve_teacher(args)
    check_outputs(args.outputs, entry_cfg["type"], TEACHERS.get(entry_cfg["type"]))
    root = Path(args.data_root) if args.data_root else resolve_path(Path("datasets") / args.dataset)
    output = Path(args.output or f"teacher_features/{args.teacher}/")
    dist = join_torchrun(kwargs)
    torch.manual_seed(args.seed)  # random-init weights must be the same on every (resumed) run
    teacher = TEACHERS.build(entry_cfg["type"], where=f"teacher '{args.teacher}'", **kwargs)
    LOG.info("teacher %s: %s; fingerprint %s", args.teacher, json.dumps(entry_cfg, default=str),
             json.dumps(teacher.fingerprint().as_dict()))
    LOG.info("caching %s splits %s of %s into %s", args.teacher, " ".join(args.splits), root, output)
    ok = True
    try:
        for split in args.splits:
            out_file, paths = fill_split(args, teacher, entry_cfg, root, split, output, dist)
            if args.verify and (dist is None or dist[0] == 0):
                ok &= verify(teacher, out_file, paths, args.verify, args.seed, args.batch_size)
    except Stopped as exc:  # the writers' `with` blocks have released their locks and closed the files
        again = "the same torchrun command" if dist is not None else rerun_command()
        exc.outcome = f"the batches already cached under {output} are kept; rerun {again} to finish the cache"
        raise
    finally:
        if dist is not None:
            import torch.distributed as tdist
            tdist.destroy_process_group()
    return 0 if ok else 1


def join_torchrun(kwargs: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """(rank, world size) when started by torchrun with WORLD_SIZE > 1 (gloo on CPU, nccl when the teacher
    runs on CUDA, each rank on cuda:LOCAL_RANK; ``kwargs['device']``, when given, is set to it; ``auto``
    resolves to it by itself); None otherwise (a single process, exactly as without torchrun)."""
    # ranks wait for each other at the shard barrier; rank 0 alone resumes a single-process file or merges
    ctx = init_distributed(kwargs.get("device", "auto"), "teacher.device", timeout=timedelta(hours=12))
    if not ctx.enabled:
        return None
    if ctx.device.type == "cuda" and "device" in kwargs:
        kwargs["device"] = str(ctx.device)
    LOG.info("torchrun: rank %d of %d (local rank %d), %s", ctx.rank, ctx.world_size, ctx.local_rank,
             "nccl" if ctx.device.type == "cuda" else "gloo")
    return ctx.rank, ctx.world_size


if __name__ == "__main__":
    entry(main)
