#!/usr/bin/env python
"""Run a frozen teacher once over a dataset split and cache its features (fp16 HDF5) for training.

    python tools/prepare_teacher_features.py --teacher sam --dataset coco128 --splits train2017 val2017 \\
        --output teacher_features/sam/ teacher.model_type=vit_b teacher.input_size=1024

Resumable: batches are fixed ranges [k*B, (k+1)*B) of the sorted image list; a rerun recomputes only
the batches that hold an unfinished image, so the final file equals an uninterrupted run's.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

import vfmkd.teachers  # noqa: E402,F401  (registers the teachers)
from vfmkd.core.config import parse_overrides, read_yaml, resolve_component, resolve_path, teacher_kwargs  # noqa: E402
from vfmkd.core.errors import ConfigError, DatasetError  # noqa: E402
from vfmkd.core.registry import TEACHERS  # noqa: E402
from vfmkd.datasets.coco_yolo import check_images, list_images, load_rgb  # noqa: E402
from vfmkd.datasets.feature_cache import FeatureCacheReader, FeatureCacheWriter, cache_file  # noqa: E402
from vfmkd.utils.cli import entry  # noqa: E402
from vfmkd.utils.logging import setup_logging  # noqa: E402

LOG = logging.getLogger("vfmkd")
MIN_COSINE = 0.999


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="sam", help="teacher name: reads configs/teachers/<teacher>.yaml (its defaults)")
    p.add_argument("--teacher-config", metavar="PATH", help="teacher YAML to use instead of configs/teachers/<teacher>.yaml")
    p.add_argument("--dataset", default="coco128", help="dataset name; its root is datasets/<dataset> unless --data-root")
    p.add_argument("--data-root", metavar="DIR", help="dataset root holding images/<split>/; None: datasets/<dataset>")
    p.add_argument("--splits", nargs="+", default=["train2017"], help="splits to cache, one <split>.h5 each")
    p.add_argument("--output", metavar="DIR", help="cache folder, one <split>.h5 per split; None: teacher_features/<teacher>/")
    p.add_argument("--features", type=lambda v: [n for n in v.split(",") if n], metavar="NAME[,NAME]",
                   help="comma-separated teacher features to cache (SAM: trunk,image_embeddings), or 'all'; None: the "
                        "teacher's primary feature (SAM: image_embeddings, 2 MiB/image at 1024; 'all' adds the 6 MiB trunk)")
    p.add_argument("--batch-size", type=int, default=4, help="images per teacher forward; a resumed file keeps its first value")
    p.add_argument("--limit", type=int, help="only the first N images of each split (keep it when resuming)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help=f"afterwards recompute N random cached images and compare; exit 1 if mean cosine < {MIN_COSINE}")
    p.add_argument("--seed", type=int, default=0, help="seeds torch (teacher.init=random weights) and the --verify pick")
    p.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none",
                   help="HDF5 filter (+shuffle) for features: gzip saves ~30-40%% but reads ~5x slower and a kill "
                        "mid-write can corrupt the file; 'none' preallocates and is crash-safe")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    p.add_argument("overrides", nargs="*", metavar="teacher.key=value",
                   help="teacher kwargs over the YAML, e.g. teacher.model_type=vit_l teacher.input_size=512 teacher.init=random")
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


def fill_split(args: argparse.Namespace, teacher: Any, entry: Dict[str, Any], root: Path, split: str, output: Path) -> Tuple[Path, List[Path]]:
    """Compute the missing batches of one split; returns the cache file and the cached image paths."""
    paths, _, skipped = check_images(list_images(root, split, args.limit), split)
    if not paths:
        raise DatasetError(f"none of the images in {root / 'images' / split} can be decoded; nothing to cache")
    out_file = cache_file(output, split)
    LOG.info("%s: %d images -> %s", split, len(paths), out_file)
    specs = selected_specs(teacher, args.features)
    compute = f"{teacher.device} torch_threads={torch.get_num_threads()}"
    writer = FeatureCacheWriter(
        out_file, [p.stem for p in paths], teacher.fingerprint(), specs, teacher.input_size,
        teacher_config=entry, dataset=args.dataset, split=split, batch_size=args.batch_size, teacher=args.teacher,
        data_root=args.data_root or "", compression=None if args.compression == "none" else args.compression,
        extra_attrs={"compute": compute},
    )
    with writer:
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
            batch_paths = paths[k * b:(k + 1) * b]
            images = [load_rgb(p) for p in batch_paths]
            feats, geo = teacher.extract_features(images)
            writer.write(k * b, feats, geo.affine, geo.valid_hw, np.array([im.shape[:2] for im in images]))
            written += len(images)
    feat_bytes = sum(s.channels * (teacher.input_size // s.stride) ** 2 * 2 for s in specs)
    meta_bytes = 4 * 2 + 4 * 4 + 4 * 2 + 1  # orig_hw, affine, valid_hw, done
    size = out_file.stat().st_size
    side = {s.name: teacher.input_size // s.stride for s in specs}
    held = " + ".join(f"{s.name} {s.channels}x{side[s.name]}x{side[s.name]} fp16" for s in specs)
    print(
        f"{split}: {written} images written, {len(paths) - written} already cached, {len(skipped)} skipped "
        f"(undecodable); {feat_bytes + meta_bytes} bytes per cached image ({held} + {meta_bytes} B geometry); "
        f"file {size / 2**20:.1f} MiB = {size / len(paths):.0f} B/image -> {out_file}"
    )
    return out_file, paths


def verify(teacher: Any, out_file: Path, paths: Sequence[Path], n: int, seed: int, batch_size: int) -> bool:
    """Recompute ``n`` random cached images and print cosine / max abs / relative L2 error per feature."""
    reader = FeatureCacheReader(out_file)
    done = [i for i in reader.image_ids if not reader.missing_ids([i])]
    pick = sorted(np.random.default_rng(seed).choice(len(done), size=min(n, len(done)), replace=False).tolist())
    ids = [done[i] for i in pick]
    if not ids:
        print(f"verify {out_file.name}: no cached images to verify")
        return False
    path_of = {p.stem: p for p in paths}
    live: Dict[str, List[torch.Tensor]] = {}
    live_affine = []
    for s in range(0, len(ids), batch_size):
        feats, geo = teacher.extract_features([load_rgb(path_of[i]) for i in ids[s:s + batch_size]])
        for name, t in feats.items():
            live.setdefault(name, []).append(t.float().cpu())
        live_affine.append(geo.affine.float().cpu())
    cached = [reader.read(i) for i in ids]
    reader.close()
    ok = torch.allclose(torch.cat(live_affine), torch.stack([c["affine"] for c in cached]))
    print(f"verify {out_file.name}: {len(ids)} images ({', '.join(ids)}); affine {'matches' if ok else 'DIFFERS'}")
    for spec in reader.feature_specs:
        a = torch.cat(live[spec.name])  # (n, C, h, w) live float32
        c = torch.stack([x["features"][spec.name] for x in cached]).float()
        cos = F.cosine_similarity(a, c, dim=1, eps=1e-12).mean().item()  # per location, over channels
        err = (a - c).abs().max().item()
        rel = ((a - c).norm() / a.norm().clamp_min(1e-12)).item()
        ok &= cos >= MIN_COSINE
        print(f"  {spec.name}: mean cosine {cos:.6f}  max abs err {err:.3g}  rel L2 err {rel:.3g}"
              f"{'' if cos >= MIN_COSINE else f'  < {MIN_COSINE}: cache does not match this teacher'}")
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or args.verify < 0:
        raise ConfigError("--batch-size and --limit must be >= 1, --verify >= 0")
    setup_logging()
    entry_cfg, kwargs = resolve_teacher(args)
    root = Path(args.data_root) if args.data_root else resolve_path(Path("datasets") / args.dataset)
    output = Path(args.output or f"teacher_features/{args.teacher}/")
    torch.manual_seed(args.seed)  # random-init weights must be the same on every (resumed) run
    teacher = TEACHERS.build(entry_cfg["type"], where=f"teacher '{args.teacher}'", **kwargs)
    LOG.info("teacher %s: %s; fingerprint %s", args.teacher, json.dumps(entry_cfg, default=str), json.dumps(teacher.fingerprint().as_dict()))
    LOG.info("caching %s splits %s of %s into %s", args.teacher, " ".join(args.splits), root, output)
    ok = True
    for split in args.splits:
        out_file, paths = fill_split(args, teacher, entry_cfg, root, split, output)
        if args.verify:
            ok &= verify(teacher, out_file, paths, args.verify, args.seed, args.batch_size)
    return 0 if ok else 1


if __name__ == "__main__":
    entry(main)
