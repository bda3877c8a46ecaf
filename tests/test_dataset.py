"""DetectionDataset on real coco128 images: letterbox geometry, label validation, bad images, batch format."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import ImageFile

from vfmkd.core.errors import DatasetError
from vfmkd.datasets import DetectionDataset, collate_samples, load_rgb

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "datasets" / "coco128"
SPLIT = "train2017"


def make_root(tmp_path: Path, n: int = 4) -> Path:
    """A tmp dataset root holding copies of the first n coco128 train images and their labels."""
    root = tmp_path / "ds"
    (root / "images" / SPLIT).mkdir(parents=True)
    (root / "object_detection" / "labels" / SPLIT).mkdir(parents=True)
    for img in sorted((COCO / "images" / SPLIT).glob("*.jpg"))[:n]:
        shutil.copy(img, root / "images" / SPLIT / img.name)
        label = COCO / "object_detection" / "labels" / SPLIT / f"{img.stem}.txt"
        if label.exists():
            shutil.copy(label, root / "object_detection" / "labels" / SPLIT / label.name)
    return root


def test_letterbox_affine_maps_labelled_box():
    ds = DetectionDataset(str(COCO), SPLIT, img_size=320, limit=8)
    i = next(k for k in range(len(ds)) if len(ds.labels[k]) and ds.orig_sizes[k][0] != ds.orig_sizes[k][1])
    sample = ds[i]
    h, w = ds.orig_sizes[i]
    r = min(320 / h, 320 / w)
    new_w, new_h = round(w * r), round(h * r)
    sx, sy, ox, oy = sample.view.affine
    assert (sx, sy) == pytest.approx((new_w / w, new_h / h))
    assert (ox, oy) == (round((320 - new_w) / 2 - 0.1), round((320 - new_h) / 2 - 0.1))
    assert sample.image.shape == (3, 320, 320) and sample.image.dtype == torch.float32
    assert sample.view.orig_hw == (h, w) and sample.image_id == ds.paths[i].stem

    # Same pixels as ultralytics' own LetterBox (the student's reference preprocessing).
    from ultralytics.data.augment import LetterBox

    orig = load_rgb(ds.paths[i])
    ref = LetterBox(new_shape=(320, 320), auto=False, scaleup=True, center=True)(image=orig)
    assert np.array_equal((sample.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), ref)

    # A labelled box: original pixel corners mapped by the affine equal the dataset's letterboxed box,
    # and the canvas shows the same content there as the original image (mean colour).
    cls, cx, cy, bw, bh = ds.labels[i][int(np.argmax(ds.labels[i][:, 3] * ds.labels[i][:, 4]))]
    x0, y0, x1, y1 = (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h
    lx0, ly0, lx1, ly1 = x0 * sx + ox, y0 * sy + oy, x1 * sx + ox, y1 * sy + oy
    k = int(np.argmax(sample.boxes.boxes[:, 2] * sample.boxes.boxes[:, 3]))
    assert sample.boxes.cls[k].item() == cls
    bx, by, bbw, bbh = (sample.boxes.boxes[k] * 320).tolist()
    assert (bx - bbw / 2, by - bbh / 2, bx + bbw / 2, by + bbh / 2) == pytest.approx((lx0, ly0, lx1, ly1), abs=1e-3)
    crop_orig = orig[int(y0):int(y1), int(x0):int(x1)].reshape(-1, 3).mean(0)
    crop_lb = ref[int(ly0):int(ly1), int(lx0):int(lx1)].reshape(-1, 3).mean(0)
    assert np.abs(crop_orig - crop_lb).max() < 6.0


def test_class_id_out_of_range_names_file_line_and_fix(tmp_path):
    root = make_root(tmp_path, 2)
    label = next((root / "object_detection" / "labels" / SPLIT).glob("*.txt"))
    label.write_text("0 0.5 0.5 0.2 0.2\n80 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError) as err:
        DetectionDataset(str(root), SPLIT, img_size=128)
    msg = str(err.value)
    assert f"{label}:2" in msg and "class id 80" in msg and "[0, 80)" in msg
    assert "model.heads.detection.num_classes" in msg
    DetectionDataset(str(root), SPLIT, img_size=128, num_classes=81)  # the fix works


@pytest.mark.parametrize("line", ["0 0.5 0.5 1.2 0.1", "0 0.5 0.5", "zero 0.5 0.5 0.1 0.1", "3 0.5 nan 0.1 0.1"])
def test_malformed_label_lines_name_file_and_line(tmp_path, line):
    root = make_root(tmp_path, 1)
    label = next((root / "object_detection" / "labels" / SPLIT).glob("*.txt"))
    label.write_text(f"1 0.5 0.5 0.2 0.2\n\n{line}\n")
    with pytest.raises(DatasetError, match=f"{label.name}:3"):
        DetectionDataset(str(root), SPLIT, img_size=128)


def test_truncated_and_garbage_images_are_skipped_and_logged(tmp_path, caplog):
    root = make_root(tmp_path, 4)
    images = root / "images" / SPLIT
    good = sorted(images.glob("*.jpg"))
    (images / "zz_cut.jpg").write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
    (images / "zz_garbage.jpg").write_bytes(b"this is not a jpeg" * 50)
    (images / "notes.txt").write_text("ignored: not an image suffix")
    with caplog.at_level(logging.WARNING, logger="vfmkd"):
        ds = DetectionDataset(str(root), SPLIT, img_size=128)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert len(ds) == 4 and ds.image_ids == [p.stem for p in good]
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["zz_cut.jpg", "zz_garbage.jpg"]
    lines = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert len(lines) == 1
    assert "skipped 2 of 6 images in train2017" in lines[0]
    assert "zz_garbage.jpg" in lines[0] and "zz_cut.jpg" in lines[0] and "image file is truncated" in lines[0]


def test_missing_label_file_means_no_objects(tmp_path):
    root = make_root(tmp_path, 2)
    for f in (root / "object_detection" / "labels" / SPLIT).glob("*.txt"):
        f.unlink()
    batch = collate_samples([s for s in DetectionDataset(str(root), SPLIT, img_size=64)])
    assert (
        batch.boxes.cls.shape == (0, 1) and batch.boxes.bboxes.shape == (0, 4) and batch.boxes.batch_idx.shape == (0,)
    )


def test_collate_is_the_batch_format_of_v8_detection_loss():
    from ultralytics.nn.modules import Detect
    from ultralytics.utils.loss import v8DetectionLoss

    ds = DetectionDataset(str(COCO), SPLIT, img_size=128, limit=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)
    batch = next(iter(loader))
    n = sum(len(lb) for lb in ds.labels)
    boxes = batch.boxes
    assert batch.images.shape == (4, 3, 128, 128)
    assert boxes.cls.shape == (n, 1) and boxes.bboxes.shape == (n, 4) and boxes.batch_idx.shape == (n,)
    assert boxes.batch_idx.tolist() == [float(i) for i, lb in enumerate(ds.labels) for _ in range(len(lb))]
    assert batch.views.affine.shape == (4, 4) and batch.views.orig_hw.shape == (4, 2)
    assert batch.image_ids == ds.image_ids
    assert 0 <= boxes.bboxes.min() and boxes.bboxes.max() <= 1

    detect = Detect(nc=80, ch=(16, 32, 64))
    detect.stride = torch.tensor([8.0, 16.0, 32.0])
    model = torch.nn.Module()
    model.model, model.args = torch.nn.ModuleList([detect]), SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    preds = detect.train()([torch.randn(4, c, 128 // s, 128 // s) for c, s in ((16, 8), (32, 16), (64, 32))])
    loss, items = v8DetectionLoss(model)(preds, boxes.as_loss_input())
    assert loss.shape == (3,) and torch.isfinite(loss).all() and items["box_loss"] > 0
