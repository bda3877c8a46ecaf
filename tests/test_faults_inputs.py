"""Fault suite, inputs (issue 22 items 1, 6, 8, 11): 16-bit grayscale images, views too thin for the
teacher's grid, head class counts against the dataset, and tools/predict.py's argument checks.
Each test fails on the code before its fix."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfmkd.cache import FeatureCacheReader
from vfmkd.datasets import DetectionDataset, check_images, load_rgb
from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
from coco_fixture_sets import SPLIT, coco_image, new_root  # noqa: E402

from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

# 1. 16-bit grayscale ---------------------------------------------------------------------------

def test_16bit_grayscale_png_is_scaled_not_clipped_everywhere(tmp_path, caplog):
    root = new_root(tmp_path)
    grey = np.asarray(Image.open(coco_image(0)).convert("L").resize((96, 72)))
    images = root / "images" / SPLIT
    Image.fromarray(grey).save(images / "a_8bit.png")
    wide = grey.astype(np.uint16) * 257  # the same picture over the full 16-bit range (x * 257: 255 -> 65535)
    Image.fromarray(wide).save(images / "b_16bit.png")
    assert Image.open(images / "b_16bit.png").mode.startswith("I")  # Pillow reads it as 16-bit grayscale
    twelve = (grey.astype(np.uint16) * 16)  # 12-bit data in a 16-bit container
    Image.fromarray(twelve).save(images / "c_12bit.png")

    rgb = load_rgb(images / "b_16bit.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (72, 96, 3)
    assert (rgb == 255).mean() < 0.05  # Pillow's convert("RGB") made 99.8 % of pixels white
    assert np.array_equal(rgb, load_rgb(images / "a_8bit.png"))  # full-range linear: exactly the 8-bit picture
    assert np.array_equal(load_rgb(images / "c_12bit.png")[..., 0], np.rint(twelve * 255.0 / 65535).astype(np.uint8))
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")  # float: [0, 1] -> 0..255
    assert (load_rgb(tmp_path / "f.tif") == 128).all()

    with caplog.at_level(logging.INFO, logger="vfmkd"):
        ok, _, skipped = check_images(sorted(images.iterdir()), SPLIT)
    assert len(ok) == 3 and not skipped
    assert "2 of 3 images are 16-bit or float grayscale" in caplog.text  # said, not silent
    assert "c_12bit.png" in caplog.text and "12-bit" in caplog.text  # the dark 12-bit image is named

    ds = DetectionDataset(str(root), SPLIT, img_size=64)  # the student's loader
    assert torch.equal(ds[0].image, ds[1].image)
    out = tmp_path / "cache"  # the cache tool's loader: the teacher sees the same picture
    assert ptf.main(["--teacher", "sam", "--data-root", str(root), "--splits", SPLIT, "--output", str(out),
                     "--no-progress",
                     "--limit", "2", "teacher.init=random", "teacher.input_size=64"]) == 0
    reader = FeatureCacheReader(out / f"{SPLIT}.h5")
    fa, fb = reader.read("a_8bit"), reader.read("b_16bit")
    assert torch.equal(fa["features"]["image_embeddings"], fb["features"]["image_embeddings"])


def test_16bit_tiff_images_are_part_of_the_split_and_other_files_are_named(tmp_path, caplog):
    """16-bit TIFF (medical, microscopy) was silently left out of a split: only jpg/png/bmp/webp were listed."""
    from vfmkd.datasets import list_images

    root = new_root(tmp_path)
    images = root / "images" / SPLIT
    grey = np.asarray(Image.open(coco_image(0)).convert("L").resize((48, 40)))
    Image.fromarray(grey).save(images / "a.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(images / "b.tif")
    (images / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="vfmkd"):
        assert [p.name for p in list_images(root, SPLIT)] == ["a.png", "b.tif"]
    assert "ignored 1 file(s)" in caplog.text and "notes.txt" in caplog.text
    assert np.array_equal(load_rgb(images / "b.tif"), load_rgb(images / "a.png"))


# 11. tools/predict.py: arguments are checked before anything is loaded -------------------------

def test_predict_refuses_a_non_image_and_a_file_as_output_before_loading_the_model(tmp_path, monkeypatch, caplog):
    from vfmkd.engine.commands import predict

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(predict, "load_student", must_not_load)
    monkeypatch.setattr(predict, "resolve_config", must_not_load)
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"not read")
    notes = tmp_path / "notes.jpg"
    notes.write_text("these are not pixels\n")
    image = coco_image(0)
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"a user's file")
    box = ["--box", "10", "20", "300", "400"]

    def run(*args: str) -> int:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="vfmkd"):
            return run_tool(predict.main, ["--checkpoint", str(checkpoint), *box, *args])

    assert run("--image", str(notes), "--output", str(tmp_path / "out")) == 2
    assert "cannot be decoded as an image" in caplog.text and "notes.jpg" in caplog.text
    assert len(caplog.records) == 1 and "Traceback" not in caplog.text
    assert run("--image", str(tmp_path), "--output", str(tmp_path / "out")) == 2
    assert "is a folder" in caplog.text
    assert run("--image", str(image), "--output", str(taken)) == 2
    assert "must be a folder" in caplog.text and str(taken) in caplog.text
    assert taken.read_bytes() == b"a user's file"  # untouched
    assert run("--image", str(image), "--output", str(taken / "sub")) == 2  # a file in the way above it
    assert "must be a folder" in caplog.text


# 8. head class counts against the dataset --------------------------------------------------------

def test_head_class_counts_are_checked_against_the_dataset_before_the_run_directory(tmp_path, caplog):
    from vfmkd.engine.commands import train as train_tool

    common = ["--no-progress", "data.limit=4", "data.num_workers=0", f"work_dir={tmp_path / 'runs'}"]
    semantic = REPO / "configs" / "experiments" / "regnet_semantic_sam_coco128.yaml"
    assert run_tool(train_tool.main, [str(semantic), *common, "model.heads.semantic.num_classes=128"]) == 2
    assert (
        "model.heads.semantic.num_classes=128" in caplog.text
        and "set model.heads.semantic.num_classes=130" in caplog.text
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no orphan run directory

    caplog.clear()  # an instance head and no detection head: the instance head's key is named
    panoptic = REPO / "configs" / "experiments" / "regnet_fusion_dsrl_sam_panoptic_coco128.yaml"
    assert run_tool(train_tool.main, [str(panoptic), *common, "model.heads.instance.num_classes=10"]) == 2
    assert "model.heads.instance.num_classes" in caplog.text and "detection.num_classes" not in caplog.text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# 6. views too thin for the teacher's grid ------------------------------------------------------

def thin_dataset(tmp_path: Path) -> Path:
    """One ordinary coco128 image and a 4000 x 300 strip of it (a panorama / line-scan shape)."""
    root = new_root(tmp_path)
    src = Image.open(coco_image(0)).convert("RGB")
    src.save(root / "images" / SPLIT / "a_plain.png")
    src.resize((4000, 300)).save(root / "images" / SPLIT / "b_strip.png")
    return root


@pytest.mark.parametrize("hw", [(4000, 300), (300, 4000), (480, 640), (427, 640)])
def test_a_flipped_view_is_the_mirrored_letterbox_to_the_pixel(hw):
    """The augmented path used unrounded letterbox offsets (118.4 px for a 300 x 4000 strip at 256): the
    content box then held a blended sliver of padding that the live teacher saw as content, and on a
    strip 1.2 teacher cells wide the cached flipped pass agreed at min cosine 0.84 (issue 22 item 6)."""
    from vfmkd.datasets import GeometricAugment
    from vfmkd.datasets.transforms import student_view

    img = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
    plain = student_view(img, 256)
    flipped = student_view(img, 256, GeometricAugment(fliplr=1.0))
    x1, y1, x2, y2 = plain.content_box
    assert flipped.flipped and flipped.content_box == (256 - x2, y1, 256 - x1, y2)
    sx, sy, ox, oy = plain.affine
    assert flipped.affine == pytest.approx((-sx, sy, 256 - ox, oy))
    assert (x2 - x1, y2 - y1) == (round(hw[1] * sx), round(hw[0] * sy))  # whole pixels: no padding inside the box


def test_images_without_a_valid_student_cell_are_counted_per_epoch(tmp_path):
    import json

    from vfmkd.engine.commands import train as train_tool

    root = thin_dataset(tmp_path)
    work = tmp_path / "runs"
    # At 64 px the strip's content is 64 x 5 pixels: no stride-16 (P4) cell centre falls inside it.
    argv = [str(REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"), "--no-progress", f"work_dir={work}",
            f"data.root={root}", f"data.val_split={SPLIT}", "data.img_size=64", "data.batch_size=2",
            "data.num_workers=0",
            "train.epochs=1", "eval.fidelity=false", "teachers.sam.offline=false", "teachers.sam.init=random",
            "teachers.sam.input_size=64"]
    assert run_tool(train_tool.main, argv) == 0
    run = next(work.rglob("metrics.json")).parent
    epoch = json.loads((run / "metrics.json").read_text())["epochs"][0]
    assert epoch["images_without_cells"] == {"feature_mse": 1}
    log = (run / "train.log").read_text()
    assert "1 training image(s) had no valid cell on the student grid for distillation.losses.feature_mse" in log
    assert "b_strip" in log
