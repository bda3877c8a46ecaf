#!/usr/bin/env python
"""Agreement of cached teacher maps carried through each augmentation with the live teacher on the
augmented image (mean cosine per location, valid locations only).

    python benchmarks/bench_aug_agreement.py                 # SAM ViT-B @ 512, student canvas 512, 32 images
    python benchmarks/bench_aug_agreement.py --quick         # @ 256, 12 images, < 60 s on 2 cores
    python benchmarks/bench_aug_agreement.py --checkpoint weights/sam_vit_b_01ec64.pth   # real SAM

For every coco128 image and augmentation kind, the offline path (the cached full-image map, or its
cached flipped pass, carried onto the student's stride-16 grid by RoIAlign) and the online path
(the live teacher run on the augmented student canvas, mapped the same way) are compared per
location. "mirrored grid" is the naive alternative the cache refuses (mirror the cached map of the
original instead of a flipped teacher pass), measured on the teacher's own grid. Samples come from
``DetectionDataset`` wrapped in ``CachedTargetsDataset`` (``collate_distill``: the cached
``TeacherTargets``, the flipped pass for mirrored views); the live path is ``OnlineTeacher.targets``.
Which views may read the cache is decided by a ``TeacherRouter`` (``offline_ratio=1``, the
augmentation's ``ViewGates``: rotations live, flips only from a cached flipped pass, crops live unless
``--crops``, views a live teacher would see displaced (``live_view_shift``) by more than
``--tolerance`` of its canvas live); the table reports the agreement over the views it routes offline.
Without a checkpoint the teacher is SAM with random weights (seed 0): the numbers then describe
geometry and resampling, not SAM's learned features; rerun with --checkpoint for the real figures.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common  # noqa: F401  (sys.path)
import numpy as np
import torch
import torch.nn.functional as F
from _common import build_cache, machine, quiet

from vfmkd.datasets import Batch, DetectionDataset, GeometricAugment, load_rgb
from vfmkd.distillation.cached import CachedTargetsDataset, collate_distill
from vfmkd.distillation.geometry import resample_to_student
from vfmkd.distillation.online_distiller import OnlineTeacher
from vfmkd.distillation.routing import TeacherRouter, TeacherSource
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.engine.builders import open_cache
from vfmkd.teachers import SamTeacher

KINDS = {
    "letterbox only": GeometricAugment(),
    "scale 0.5": GeometricAugment(scale=0.5),
    "translate 0.2 (crop)": GeometricAugment(translate=0.2),
    "scale 0.5 + translate 0.1": GeometricAugment(scale=0.5, translate=0.1),
    "flip (cached flipped pass)": GeometricAugment(fliplr=1.0),
    "flip + scale + translate": GeometricAugment(fliplr=1.0, scale=0.5, translate=0.1),
}
STRIDE = 16


def cosine_on_student_grid(off: TeacherTargets, on: TeacherTargets, batch: Batch, size: int) -> torch.Tensor:
    """Per-location cosine of two teachers' targets carried onto the student grid, as
    ``Distiller.aligned`` carries them (cached targets: the batch's view affines)."""
    h = w = size // STRIDE
    maps = []
    for t in (off, on):
        student_affine = t.student_affine if t.student_affine is not None else batch.views.affine
        m, mask = resample_to_student(t.feature("image_embeddings", torch.device("cpu")), t.affine, t.valid_hw,
                                      (t.input_size, t.input_size), student_affine, (h, w), STRIDE)
        maps.append((m, mask))
    (a, ma), (b, mb) = maps
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-6)
    valid = (ma * mb)[:, 0].bool()
    return cos[valid]


def mirrored_grid_cosine(teacher, batch_images):
    """cos(F(mirror(x)), mirror(F(x))) on the teacher grid over the valid region."""
    vals = []
    for img in batch_images:
        fa, tb = teacher.extract_features([img])
        fb, _ = teacher.extract_features([np.ascontiguousarray(img[:, ::-1])])
        vh, vw = (int(np.ceil(v / STRIDE)) for v in tb.valid_hw[0].tolist())
        a = fa["image_embeddings"][..., :vh, :vw].flip(-1)
        b = fb["image_embeddings"][..., :vh, :vw]
        vals.append(F.cosine_similarity(a, b, dim=1).flatten())
    return torch.cat(vals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-size", type=int, default=512)
    p.add_argument("--img-size", type=int, default=512, help="student canvas (the live teacher sees this resolution)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--checkpoint", help="official SAM ViT-B checkpoint; default: random init (seed 0)")
    p.add_argument("--draws", type=int, default=2, help="augmentation draws per image")
    p.add_argument("--tolerance", type=float, default=0.05, help="distillation.offline_max_shift")
    p.add_argument("--crops", action="store_true", help="distillation.offline_crops=true")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.teacher_size, a.img_size, a.images, a.draws = 256, 256, 12, 1
    torch.set_num_threads(2)
    quiet()
    work = Path(tempfile.mkdtemp(prefix="vfmkd_agree_"))
    if a.checkpoint:
        from vfmkd.engine.commands import prepare_features as ptf
        assert ptf.main(["--teacher", "sam", "--limit", str(a.images), "--with-flip", "--output", str(work / "sam"),
                         "--no-progress", f"teacher.input_size={a.teacher_size}",
                         f"teacher.checkpoint={a.checkpoint}"]) == 0
        teacher = SamTeacher(input_size=a.teacher_size, checkpoint=a.checkpoint)
    else:
        build_cache(work / "sam", a.teacher_size, a.images, with_flip=True)
        teacher = SamTeacher(init="random", input_size=a.teacher_size, seed=0)
    quiet()
    online = OnlineTeacher("sam", teacher, torch.device("cpu"))
    root = str(_common.REPO / "datasets" / "coco128")
    # The cache as the engine opens it (fingerprint-checked against this teacher's config).
    entry = {"type": "sam", "feature_path": str(work / "sam"), "input_size": a.teacher_size,
             **({"checkpoint": a.checkpoint} if a.checkpoint else {"init": "random", "seed": 0})}
    cache = open_cache("sam", entry, "coco128", "train2017")
    assert cache.has_flip, "the cache needs its flipped pass (--with-flip)"
    print(f"machine: {machine()}")
    print(f"SAM ViT-B @ {a.teacher_size} ({'checkpoint' if a.checkpoint else 'random init'}), student canvas "
          f"{a.img_size}, stride-{STRIDE} grid, {a.images} coco128 train images")
    print(f"(views allowed offline, as the TeacherRouter decides: not rotated, flips from the flipped pass, "
          f"{'crops allowed' if a.crops else 'no crops'}, live view displaced <= {a.tolerance:.0%} of the teacher "
          "canvas)")
    print("| augmentation | views allowed offline | mean cosine, allowed views | 5th pct, allowed | mean cosine, all "
          "views |")
    print("|---|---|---|---|---|")
    for kind, aug in KINDS.items():
        allowed, every, n_ok, n = [], [], 0, 0
        # offline_ratio=1: only the view gates of this augmentation (and the cache) can send a view live.
        source = TeacherSource(name="sam", offline=True, cache=cache, input_affine=SamTeacher.input_affine,
                               load_live=lambda: online, live=online)
        router = TeacherRouter({"sam": source}, offline_ratio=1.0, seed=0, augment=aug,
                               offline_max_shift=a.tolerance, offline_crops=a.crops)
        for draw in range(a.draws):
            plain = DetectionDataset(root, "train2017", a.img_size, a.images, augment=aug, seed=draw)
            ds = CachedTargetsDataset(plain, {"sam": cache})
            for i in range(len(ds)):
                item = collate_distill([ds[i]])  # one view per batch: the router decides per batch
                batch, cached = item.batch, item.cached.get("sam")
                assert cached is not None, f"image {batch.image_ids[0]} is missing from the cache"
                v = cosine_on_student_grid(cached, online.targets(batch), batch, a.img_size)
                every.append(v)
                n += 1
                if router.route(n, "sam", batch, cached).mode == "offline":
                    allowed.append(v)
                    n_ok += 1
        ok = torch.cat(allowed) if allowed else torch.zeros(0)
        def fmt(t, q=None):
            return "-" if t.numel() == 0 else f"{(t.mean() if q is None else t.quantile(q)):.4f}"
        print(f"| {kind} | {n_ok}/{n} | {fmt(ok)} | {fmt(ok, 0.05)} | {fmt(torch.cat(every))} |")
    ds = DetectionDataset(root, "train2017", a.img_size, a.images)
    v = mirrored_grid_cosine(teacher, [load_rgb(p) for p in ds.paths])
    print(f"| flip by mirroring the cached grid (not offered) | 0 | - | - | {v.mean():.4f} |")
    print("| rotation | 0 (always live) | - | - | - |")


if __name__ == "__main__":
    main()
