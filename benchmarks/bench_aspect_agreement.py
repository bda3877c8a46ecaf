#!/usr/bin/env python
"""Agreement of cached teacher maps with the live teacher on extreme aspect ratios, against how many
teacher cells the view's content spans on its short side.

    python benchmarks/bench_aspect_agreement.py            # SAM ViT-B @ 512, students 160/256/512, 3 images per shape
    python benchmarks/bench_aspect_agreement.py --quick    # @ 256, students 160/256, 2 images per shape

coco128 train images are resized to each shape (4000x300, 300x4000, ...), cached with the real tool
(``--with-flip``), then for the plain letterbox and for a mirrored view (the cached flipped pass)
the cached map and a live pass on the student canvas are carried onto the student's stride-16 grid
(RoIAlign, as the distiller does) and compared per valid cell. ``teacher cells`` is the view's
content extent on the cached teacher grid, short side (:func:`view_teacher_cells`); ``no cell``
counts views with no valid student cell (no distillation signal). Without a checkpoint the teacher
is SAM with random weights (seed 0): the numbers then describe geometry and resampling.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common  # noqa: F401  (sys.path)
import torch
from _common import machine, quiet
from bench_aug_agreement import STRIDE, cosine_on_student_grid
from PIL import Image

from vfmkd.datasets import DetectionDataset, GeometricAugment, load_rgb
from vfmkd.datasets.records import ViewGeometry
from vfmkd.distillation.cached import CachedTargetsDataset, collate_distill
from vfmkd.distillation.online_distiller import OnlineTeacher
from vfmkd.engine.builders import open_cache
from vfmkd.teachers import SamTeacher

# (w, h): the short side spans ~1, 1.2, 1.5, 2, 4 and 12 cells of a stride-16 teacher at 256 (x2 at 512),
# both orientations
SHAPES = tuple(s for w, h in ((4000, 250), (4000, 300), (4000, 375), (4000, 500), (4000, 1000), (640, 480))
               for s in ((w, h), (h, w)))


def view_teacher_cells(view: ViewGeometry, cached_affine: torch.Tensor, cached_valid_hw: torch.Tensor,
                       stride: int) -> float:
    """Teacher cells (stride ``stride``) the view's visible content spans on the cached grid, short side:
    the content box carried back to the original image, into the cached pass's frame, clipped to its
    unpadded region."""
    x1, y1, x2, y2 = view.content_box
    valid_h, valid_w = (float(v) for v in cached_valid_hw.tolist())
    extents = []
    for axis, (lo, hi), limit in ((0, (x1, x2), valid_w), (1, (y1, y2), valid_h)):
        s, o = view.matrix[axis, axis], view.matrix[axis, 2]
        t, to = float(cached_affine[axis]), float(cached_affine[axis + 2])
        ends = sorted(t * (edge - o) / s + to for edge in (lo, hi))
        extents.append(max(0.0, min(ends[1], limit) - max(ends[0], 0.0)))
    return min(extents) / float(stride)


def write_dataset(root: Path, per_shape: int) -> None:
    images = root / "images" / "train2017"
    images.mkdir(parents=True)
    (root / "object_detection" / "labels" / "train2017").mkdir(parents=True)
    sources = sorted((_common.REPO / "datasets" / "coco128" / "images" / "train2017").glob("*.jpg"))
    for w, h in SHAPES:
        for k in range(per_shape):
            Image.fromarray(load_rgb(sources[k])).resize((w, h), Image.BILINEAR).save(images / f"s{w}x{h}_{k}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-size", type=int, default=512)
    p.add_argument("--img-sizes", type=int, nargs="+", default=[160, 256, 512])
    p.add_argument("--per-shape", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.teacher_size, a.img_sizes, a.per_shape = 256, [160, 256], 2
    torch.set_num_threads(2)
    quiet()
    work = Path(tempfile.mkdtemp(prefix="vfmkd_aspect_"))
    root = work / "ds"
    write_dataset(root, a.per_shape)
    from vfmkd.engine.commands import prepare_features as ptf
    assert ptf.main(["--teacher", "sam", "--data-root", str(root), "--splits", "train2017", "--with-flip",
                     "--batch-size", "2",
                     "--output", str(work / "sam"), "--no-progress", "teacher.init=random",
                     f"teacher.input_size={a.teacher_size}"]) == 0
    quiet()
    teacher = SamTeacher(init="random", input_size=a.teacher_size, seed=0)
    online = OnlineTeacher("sam", teacher, torch.device("cpu"))
    entry = {"type": "sam", "feature_path": str(work / "sam"), "input_size": a.teacher_size, "init": "random",
             "seed": 0}
    cache = open_cache("sam", entry, root.name, "train2017")
    print(f"machine: {machine()}")
    print(f"SAM ViT-B @ {a.teacher_size} (random init), stride-{STRIDE} student grid, {a.per_shape} coco128 images per "
          "shape")
    print("| shape (w x h) | student | view | teacher cells (short side) | mean cosine | 5th pct | min cosine | views "
          "with no valid cell |")
    print("|---|---|---|---|---|---|---|---|")
    for size in a.img_sizes:
        for view_kind, aug in (("letterbox", None), ("flip (cached flipped pass)", GeometricAugment(fliplr=1.0))):
            ds = CachedTargetsDataset(DetectionDataset(str(root), "train2017", size, augment=aug), {"sam": cache})
            rows = {}
            for i in range(len(ds)):
                item = collate_distill([ds[i]])
                batch, cached = item.batch, item.cached["sam"]
                cos = cosine_on_student_grid(cached, online.targets(batch), batch, size)
                cells = view_teacher_cells(batch.views.view(0), cached.affine[0], cached.valid_hw[0], STRIDE)
                shape = batch.image_ids[0].split("_")[0][1:]
                rows.setdefault(shape, []).append((cos, cells))
            for shape, got in rows.items():
                allc = torch.cat([c for c, _ in got])
                empty = sum(1 for c, _ in got if c.numel() == 0)
                cells = min(n for _, n in got)
                mean = f"{allc.mean():.4f}" if allc.numel() else "-"
                p5 = f"{allc.quantile(0.05):.4f}" if allc.numel() else "-"
                low = f"{allc.min():.4f}" if allc.numel() else "-"
                print(f"| {shape} | {size} | {view_kind} | {cells:.1f} | {mean} | {p5} | {low} | {empty}/{len(got)} |")


if __name__ == "__main__":
    main()
