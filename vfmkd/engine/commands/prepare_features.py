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
``<split>.shard<r>of<N>.h5`` (resumable per shard), then rank 0 writes ``<split>.h5`` as a small index
over them (seconds, whatever the size; the reader opens the shards through it), or with ``--join``
copies them into one ``<split>.h5`` (vfmkd/cache/shards.py): bit-identical to a single-process cache at
equal torch thread counts.

This module builds what the loop is handed (the teacher from its YAML and ``teacher.*`` overrides,
the split's images and label prompts) and reports; the loop itself is :mod:`vfmkd.cache.fill`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

import vfmkd.distillation.vfmkd_model_teacher  # noqa: F401  (registers the vfmkd teacher, to refuse it by name)
import vfmkd.teachers  # noqa: F401  (registers the teachers)
from vfmkd.cache.codec import STORAGES, bytes_per_image, mask_bytes
from vfmkd.cache.fill import BoxPrompts, FillSettings, fill_cache, selected_specs
from vfmkd.cache.format import OUTPUTS, cache_file, label_files_sha256
from vfmkd.cache.shards import cache_bytes
from vfmkd.cache.verify import MIN_COSINE, verify
from vfmkd.cache.writer import MaskPlan
from vfmkd.core.config import (
    import_custom_modules,
    parse_overrides,
    read_yaml,
    resolve_component,
    resolve_path,
    teacher_kwargs,
)
from vfmkd.core.errors import ConfigError, DatasetError
from vfmkd.core.registry import TEACHERS
from vfmkd.datasets.coco_yolo import parse_labels
from vfmkd.datasets.image_files import check_images, list_images, load_rgb
from vfmkd.datasets.sources import FORMATS, SplitList, check_unique_ids, find_images, open_split
from vfmkd.engine.training.distributed import init_distributed, leave_distributed
from vfmkd.teachers.base import segmenting_teachers
from vfmkd.utils.logging import setup_logging
from vfmkd.utils.stop_signals import Stopped, rerun_command

LOG = logging.getLogger("vfmkd")


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
    p.add_argument("--data-root", metavar="PATH", help="the data (docs/your_data.md): a vfmkd dataset root holding "
                                                       "images/<split>/, an ultralytics dataset YAML, a COCO root or a "
                                                       "folder of images; None: datasets/<dataset>")
    p.add_argument("--data-format", choices=FORMATS, default="auto", help="what --data-root is (data.format)")
    p.add_argument("--coco-json", metavar="FILE", help="COCO instances JSON of the (one) split; None: "
                                                        "<data-root>/annotations/instances_<split>.json")
    p.add_argument("--unlabelled", metavar="DIR", help="a folder of unlabelled images (any depth) added to the first "
                                                        "of --splits, as data.unlabelled adds them to the train split")
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
    p.add_argument("--join", action="store_true",
                   help="under torchrun: copy the finished shards into one self-contained <split>.h5 (one read and "
                        "write of the whole cache) instead of indexing them in seconds; also joins an existing index")
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


def label_dir(root: Path, split: str) -> Path:
    """Where the detection labels of ``split`` live (as DetectionDataset reads them)."""
    return Path(root) / "object_detection" / "labels" / split


def split_images(args: argparse.Namespace, root: Path, split: str) -> Tuple[List[Path], Optional[SplitList]]:
    """The images of ``split`` in the order training lists them (:class:`~vfmkd.datasets.DetectionDataset`):
    its source's, or vfmkd's layout's (source None), then the --unlabelled ones (first split only)."""
    json_path = Path(args.coco_json) if args.coco_json else None
    source = open_split(args.data_format, root, split, args.num_classes, "--num-classes", json_path)
    listed = list_images(root, split, args.limit) if source is None else source.paths[:args.limit]
    extra = find_images(Path(args.unlabelled))[:args.limit] if args.unlabelled and split == args.splits[0] else []
    check_unique_ids(listed + extra, f"split {split}")
    return listed + extra, source


def label_prompts(root: Path, split: str, paths: Sequence[Path], num_classes: int) -> BoxPrompts:
    """The mask prompts of a split: per image the (K, 5) ``class cx cy w h`` rows of its label file
    (``parse_labels``; row j is label_index j), the label files' hash and where they came from."""
    folder = label_dir(root, split)
    ids = [p.stem for p in paths]
    rows = tuple(parse_labels(folder / f"{i}.txt", num_classes, "--num-classes") for i in ids)
    try:
        rel = folder.resolve().relative_to(Path(root).resolve())
    except ValueError:
        rel = folder
    return BoxPrompts(rows, MaskPlan(cls=tuple(r[:, 0].astype(np.int64) for r in rows),
                                     prompt_source=f"detection-labels:{rel.as_posix()}",
                                     labels_sha256=label_files_sha256(folder, ids), num_classes=num_classes))


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


def fill_settings(args: argparse.Namespace, entry: Dict[str, Any]) -> FillSettings:
    """What every cache file of this run records, from the command line and the resolved teacher entry."""
    return FillSettings(
        teacher=args.teacher, teacher_config=entry, dataset=args.dataset, data_root=args.data_root or "",
        batch_size=args.batch_size, features=tuple(args.features) if args.features else None,
        compression=None if args.compression == "none" else args.compression, storage=args.storage,
        with_flip=args.with_flip, progress=not args.no_progress, join=args.join)


def fill_split(args: argparse.Namespace, teacher: Any, entry: Dict[str, Any], root: Path, split: str, output: Path,
               dist: Optional[Tuple[int, int]] = None) -> Tuple[Path, List[Path]]:
    """Compute the missing batches of one split and print what the cache holds; returns the cache file
    and the cached image paths. ``dist`` = (rank, world size) under torchrun (:func:`fill_cache`)."""
    listed, source = split_images(args, root, split)
    paths, _, skipped = check_images(listed, split)
    if not paths:
        raise DatasetError(f"none of the images of split {split} in {root} can be decoded; nothing to cache")
    out_file = cache_file(output, split)
    LOG.info("%s: %d images -> %s", split, len(paths), out_file)
    selected_specs(teacher, args.features)  # an unknown --features name is refused before the labels are read
    compute = f"{teacher.device} torch_threads={torch.get_num_threads()}"
    if "masks" in args.outputs and source is not None:
        raise ConfigError(f"--outputs masks prompts the teacher with the boxes of vfmkd's layout (object_detection/"
                          f"labels); {source.source} is another format: cache its features only (--outputs features)")
    prompts = label_prompts(root, split, paths, args.num_classes) if "masks" in args.outputs else None
    done = fill_cache(fill_settings(args, entry), teacher, split, out_file, paths, load_rgb, compute, prompts, dist)
    if done is None:  # a rank other than 0: rank 0 reports
        return out_file, paths
    written, stats = done
    report_split(args, teacher, split, out_file, len(paths), written, len(skipped), stats)
    if prompts is not None:
        report_masks(args, teacher, split, len(paths), prompts)
    return out_file, paths


def report_split(args: argparse.Namespace, teacher: Any, split: str, out_file: Path, images: int, written: int,
                 skipped: int, stats: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]) -> None:
    """Print the split's counts, bytes per image and file size; log the statistics."""
    specs = selected_specs(teacher, args.features)
    feat_bytes, other_bytes = bytes_per_image(specs, teacher.input_size, args.storage, args.with_flip)
    for name, (mean, std) in (stats or {}).items():
        LOG.info("%s stats: %s per-channel mean in [%.3g, %.3g], std in [%.3g, %.3g] (stored as stats/%s/{mean,std})",
                 split, name, mean.min(), mean.max(), std.min(), std.max(), name)
    size = cache_bytes(out_file)  # an index: its shards too
    side = {s.name: teacher.input_size // s.stride for s in specs}
    held = " + ".join(f"{s.name} {s.channels}x{side[s.name]}x{side[s.name]}" for s in specs)
    storage = "int8 + float32 cell and channel scales" if args.storage == "int8" else "float16"
    print(
        f"{split}: {written} images written, {images - written} already cached, {skipped} skipped "
        f"(undecodable); storage {args.storage}{', with flip pass' if args.with_flip else ''}: "
        f"{feat_bytes + other_bytes} bytes per cached image ({feat_bytes / 2**20:.4f} MiB features: {held} {storage}"
        f"{' x2 passes' if args.with_flip else ''}; {other_bytes} B geometry + statistics); "
        f"file {size / 2**20:.1f} MiB = {size / images:.0f} B/image"
        f"{'' if stats else ' (statistics pending: cache unfinished)'} -> {out_file}"
    )


def report_masks(args: argparse.Namespace, teacher: Any, split: str, images: int, prompts: BoxPrompts) -> None:
    """Print how many label boxes were prompted and what their mask logits cost per image."""
    count = int(prompts.plan.offsets[-1])
    per_mask = mask_bytes(args.storage, teacher.input_size // 4, args.with_flip)
    side = teacher.input_size // 4
    print(
        f"{split}: mask logits of {count} label boxes ({count / images:.2f} per image, "
        f"{prompts.plan.prompt_source}): {per_mask} bytes per mask ({side}x{side} "
        f"{args.storage}{' + float32 scale' if args.storage == 'int8' else ''}"
        f"{' x2 passes' if args.with_flip else ''} + box, label row, class) = {per_mask * count / images:.0f} "
        f"bytes per cached image"
    )


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
    """Cache the teacher's outputs of every split; 0, or 1 when --verify finds a mismatch."""
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
                ok &= verify(teacher, out_file, paths, load_rgb, args.verify, args.seed, args.batch_size)
    except Stopped as exc:  # the writers' `with` blocks have released their locks and closed the files
        again = "the same torchrun command" if dist is not None else rerun_command()
        exc.outcome = f"the batches already cached under {output} are kept; rerun {again} to finish the cache"
        raise
    finally:
        if dist is not None:
            leave_distributed()
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


