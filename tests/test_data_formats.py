"""Data as it comes (docs/your_data.md): an ultralytics dataset YAML, a COCO instances JSON and a folder of
unlabelled images, built in tmp from real coco128 files, load with the same images, boxes and masks as the
native layout; a labelled set plus unlabelled images trains (task losses on the labelled images only) and
caches; bad input is named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from vfmkd.core.config import load_experiment
from vfmkd.core.config_schema import DataConfig
from vfmkd.core.errors import ConfigError, DatasetError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import LOSSES
from vfmkd.datasets import DetectionDataset, collate_samples
from vfmkd.datasets.masks import InstanceClassTable, parse_polygons
from vfmkd.datasets.sources import detect_format, open_split
from vfmkd.engine.builders import build_dataset
from vfmkd.engine.training.trainer import Trainer
from vfmkd.models.heads.yolo_head import YOLOv8DetectHead

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

COCO = REPO / "datasets" / "coco128"
SPLIT, SIZE, TEACHER_SIZE, N = "train2017", 128, 64, 4
EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
DETECT = {"detection": {"type": "yolo_head", "num_classes": 80}}


def _ids() -> list[str]:
    """The first N train images that have instance polygons (so every format holds the same objects)."""
    stems = sorted(p.stem for p in (COCO / "images" / SPLIT).glob("*.jpg"))
    return [s for s in stems if (COCO / "instance_segmentation" / "labels" / SPLIT / f"{s}.txt").is_file()][:N]


def _polygons(stem: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """coco128's polygons of an image with detection class ids (panoptic ids mapped by name)."""
    table = InstanceClassTable.load(COCO, 80)
    return parse_polygons(COCO / "instance_segmentation" / "labels" / SPLIT / f"{stem}.txt", table)


def _link_images(folder: Path, ids: list[str]) -> None:
    folder.mkdir(parents=True)
    for stem in ids:
        (folder / f"{stem}.jpg").symlink_to(COCO / "images" / SPLIT / f"{stem}.jpg")


def _ultralytics(root: Path, ids: list[str], segments: bool, names) -> Path:
    _link_images(root / "images" / "train", ids)
    labels = root / "labels" / "train"
    labels.mkdir(parents=True)
    for stem in ids:
        if segments:
            cls, polys = _polygons(stem)
            lines = [" ".join([str(int(c)), *(f"{v:.6f}" for v in p.reshape(-1))]) for c, p in zip(cls, polys)]
            (labels / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        else:
            shutil.copy(COCO / "object_detection" / "labels" / SPLIT / f"{stem}.txt", labels / f"{stem}.txt")
    (labels / "no_such_image.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # a label without its image
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/train", "names": names}))
    return path


def _coco_json(path: Path, ids: list[str]) -> Path:
    """An instances JSON of coco128's polygons: category id = 2 x detection id + 1 (not contiguous), one
    RLE annotation, one of an unknown category, one image whose file is not there."""
    names = yaml.safe_load((COCO / "object_detection" / "config.yaml").read_text())["names"]
    images, anns = [], []
    for k, stem in enumerate(ids):
        w, h = Image.open(COCO / "images" / SPLIT / f"{stem}.jpg").size
        images.append({"id": k, "file_name": f"{stem}.jpg", "height": h, "width": w})
        for c, p in zip(*_polygons(stem)):
            px = p * (w, h)
            (x1, y1), (x2, y2) = px.min(0), px.max(0)
            anns.append({"id": len(anns), "image_id": k, "category_id": 2 * int(c) + 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": [px.reshape(-1).tolist()]})
    first = anns[0]
    rle = mask_utils.merge(mask_utils.frPyObjects(first["segmentation"], images[0]["height"], images[0]["width"]))
    rle["counts"] = rle["counts"].decode()
    anns.append({**first, "id": len(anns), "segmentation": rle})
    anns.append({**first, "id": 999, "category_id": 1000})
    images.append({"id": 77, "file_name": "gone.jpg", "height": 10, "width": 10})
    cats = [{"id": 2 * i + 1, "name": n} for i, n in sorted(names.items())]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    tmp, ids = tmp_path_factory.mktemp("formats"), _ids()
    names = yaml.safe_load((COCO / "object_detection" / "config.yaml").read_text())["names"]
    folder = tmp / "unlabelled"
    for k, src in enumerate(sorted((COCO / "images" / "val2017").glob("*.jpg"))[:3]):
        nested = folder / ("a" if k == 0 else "a/b" if k == 1 else "c")
        nested.mkdir(parents=True, exist_ok=True)
        if k == 2:  # a PNG, upper-case suffix
            Image.open(src).convert("RGB").save(nested / f"{src.stem}.PNG")
        else:
            shutil.copy(src, nested / (f"{src.stem}.JPG" if k else src.name))
    (folder / "a" / "notes.txt").write_text("not an image")
    return {"ids": ids, "detect": _ultralytics(tmp / "det", ids, False, [names[i] for i in range(80)]),
            "segment": _ultralytics(tmp / "seg", ids, True, names), "coco": _coco_json(tmp / "inst.json", ids),
            "images": folder, "tmp": tmp}


def native(instances: bool = False) -> DetectionDataset:
    ds = DetectionDataset(str(COCO), SPLIT, SIZE, limit=128, instances=instances)
    return ds


def _subset(ds: DetectionDataset, ids: list[str]) -> list[int]:
    return [ds.image_ids.index(i) for i in ids]


def test_formats_are_detected_from_the_path(sets):
    assert detect_format(sets["detect"], SPLIT) == "ultralytics"
    assert detect_format(COCO, SPLIT) == "vfmkd"
    assert detect_format(COCO, SPLIT, sets["coco"]) == "coco"
    assert detect_format(sets["images"], SPLIT) == "images"


def test_ultralytics_detect_yaml_has_the_native_boxes(sets):
    source = open_split("auto", sets["detect"], SPLIT, 80, "k")
    assert [p.stem for p in source.paths] == sets["ids"] and source.names[0] == "person"
    assert [Path(p).name for p, _ in source.skipped] == ["no_such_image.txt"]  # counted, named
    ds = DetectionDataset(str(sets["detect"]), SPLIT, SIZE, source=source)
    ref = native()
    for i, j in zip(range(len(ds)), _subset(ref, sets["ids"])):
        assert np.array_equal(ds.labels[i], ref.labels[j])
    assert all(ds.labelled)


def test_ultralytics_segment_yaml_and_coco_json_have_the_native_masks(sets):
    seg = DetectionDataset(str(sets["segment"]), SPLIT, SIZE, instances=True,
                           source=open_split("ultralytics", sets["segment"], SPLIT, 80, "k"))
    coco_source = open_split("auto", COCO, SPLIT, 80, "k", sets["coco"])
    skipped = " ".join(why for _, why in coco_source.skipped)
    assert "unknown category_id 1000" in skipped and "file not found" in skipped
    coco = DetectionDataset(str(COCO), SPLIT, SIZE, instances=True, source=coco_source)
    assert coco.names == seg.names and len(coco.names) == 80  # contiguous ids, names from the JSON
    ref = native(instances=True)
    for k, j in enumerate(_subset(ref, sets["ids"])):
        want = ref[j].instances
        for got in (seg[k].instances, coco[k].instances):
            n = len(want.cls)
            assert torch.equal(got.cls[:n], want.cls)
            assert torch.allclose(got.boxes[:n], want.boxes, atol=1e-3)
            assert (got.masks[:n] != want.masks).float().mean() < 1e-3
    rle_mask, poly_mask = coco[0].instances.masks[-1].bool(), coco[0].instances.masks[0].bool()
    assert (rle_mask & poly_mask).sum() / (rle_mask | poly_mask).sum() > 0.8  # the RLE copy of annotation 0


def test_image_folder_any_depth_any_case_unlabelled(sets):
    ds = build_dataset(DataConfig(root=str(sets["images"]), img_size=SIZE), SPLIT, 80)
    assert len(ds) == 3 and not any(ds.labelled)
    batch = collate_samples([ds[0], ds[1]])
    assert batch.labelled.tolist() == [False, False] and len(batch.boxes.cls) == 0


def test_task_losses_skip_unlabelled_images(sets):
    torch.manual_seed(0)
    head = YOLOv8DetectHead([FeatureSpec(f"P{k}", 8, 2 ** k) for k in (3, 4, 5)], num_classes=80).train()
    loss = LOSSES.build("detection", head=head)
    data = DataConfig(root=str(sets["detect"]), img_size=SIZE, unlabelled=str(sets["images"]))
    ds = build_dataset(data, SPLIT, 80)
    assert ds.labelled == [True] * N + [False] * 3
    feats = {f"P{k}": torch.randn(2, 8, SIZE // 2 ** k, SIZE // 2 ** k) for k in (3, 4, 5)}
    mixed = collate_samples([ds[0], ds[N]])
    alone = collate_samples([ds[0]])
    out = head(feats)
    value = loss(out, mixed)[0]
    ref = loss({k: (v[:1] if torch.is_tensor(v) else [f[:1] for f in v]) for k, v in out.items()}, alone)[0]
    assert torch.allclose(value, ref)  # the unlabelled image adds nothing, not even "no objects"


def _experiment(path: Path, cache: Path, work_dir: Path) -> Path:
    """A YOLOv8-n student with a detection head, distilled from a cached random-init DINO ViT-S/16."""
    path.write_text(yaml.safe_dump({
        "experiment_name": "formats", "work_dir": str(work_dir),
        "model": {"backbone": {"type": "yolov8", "config": str(REPO / "configs/backbones/yolov8n.yaml")},
                  "neck": {"type": "yolov8_pafpn", "depth": 1}, "heads": DETECT},
        "teachers": {"dino": {"type": "dino", "init": "random", "input_size": TEACHER_SIZE,
                              "feature_path": str(cache)}},
        "distillation": {"losses": {"feature_mse": {"teacher": "dino"}, "detection": {"weight": 1.0}},
                         "standardize": False},
        "data": {"img_size": 96, "batch_size": 8, "num_workers": 0},
        "train": {"epochs": 1, "warmup_iters": 1, "vis_interval": 0, "loggers": []},
        "eval": {"batch_size": 4, "fidelity": False}}))
    return path


@pytest.fixture(scope="module")
def dino_cache(sets) -> Path:
    """The cache tool on an ultralytics YAML plus a folder of unlabelled images (every image the
    training runs below read), and on an image folder alone."""
    import h5py
    common = ["--teacher", "dino", "--splits", SPLIT, "--batch-size", "8", "--no-progress", "teacher.init=random",
              f"teacher.input_size={TEACHER_SIZE}"]
    cache, folder_cache = sets["tmp"] / "dino", sets["tmp"] / "folder"
    assert ptf.main(["--data-root", str(sets["detect"]), "--unlabelled", str(sets["images"]),
                     "--output", str(cache), *common]) == 0
    assert ptf.main(["--data-root", str(sets["images"]), "--limit", "2", "--output", str(folder_cache), *common]) == 0
    for out, count in ((cache, N + 3), (folder_cache, 2)):
        with h5py.File(out / f"{SPLIT}.h5") as f:
            assert len(f["image_ids"]) == count
    return cache


@pytest.mark.parametrize("case", ["mixed", "images"])
def test_each_format_trains_a_step(sets, dino_cache, tmp_path, caplog, case):
    """An ultralytics YAML plus unlabelled images (mixed), and an image folder alone (feature-only); the
    COCO JSON reaches the same dataset (its loading is compared with the native one above)."""
    overrides = {"mixed": [f"data.root={sets['detect']}", f"data.unlabelled={sets['images']}"],
                 "images": [f"data.root={sets['images']}"]}[case]
    caplog.set_level("INFO", logger="vfmkd")
    path = _experiment(tmp_path / "exp.yaml", dino_cache, tmp_path)
    if case == "images":  # feature-only: no task loss (a task loss on unlabelled images is refused)
        spec = yaml.safe_load(path.read_text())
        del spec["distillation"]["losses"]["detection"]
        path.write_text(yaml.safe_dump(spec))
    trainer = Trainer(load_experiment(path, overrides), progress=False)
    train = trainer.train_one_epoch(1)  # one step: every image of the split in one batch
    assert np.isfinite(train["loss_feat_distill_dino"])
    assert trainer.router.summary()["dino"] == {"offline": 1}  # every image, unlabelled too, from the cache
    if case == "mixed":
        assert "data train2017: 7 images, 4 labelled, 3 unlabelled, 80 classes" in caplog.text
        assert train["images_labelled"] == N and train["images_unlabelled"] == 3  # the epoch line's counts
        assert np.isfinite(train["loss_det"])


def test_a_task_loss_on_unlabelled_images_is_refused_naming_the_task(sets):
    data = DataConfig(root=str(sets["images"]), img_size=SIZE)
    with pytest.raises(ConfigError, match="task 'detection' needs labels: distillation.losses.det trains "
                                          "model.heads.detection"):
        build_dataset(data, SPLIT, 80, tasks=["detection"], heads=DETECT,
                      losses={"feature_mse": {"type": "feature_mse"}, "det": {"type": "detection"}})
    # feature and output losses alone need no labels: the head is distilled, its metrics score nothing
    assert len(build_dataset(data, SPLIT, 80, tasks=["detection"], heads=DETECT,
                             losses={"feature_mse": {"type": "feature_mse"}})) == 3


def test_a_class_table_shorter_than_the_labels_names_file_and_line(sets, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"path": str(sets["detect"].parent), "train": "images/train",
                                   "val": "images/train", "names": ["a", "b"]}))
    with pytest.raises(DatasetError, match=r"labels/train/\d+\.txt:1: class id \d+ is not in the class table"):
        open_split("auto", bad, SPLIT, 80, "k")


def test_missing_listed_image_is_skipped_and_duplicate_ids_refused(sets, tmp_path):
    listing = tmp_path / "list.txt"
    images = sets["detect"].parent / "images" / "train"
    listing.write_text("\n".join([str(images / f"{sets['ids'][0]}.jpg"), str(images / "missing.jpg")]))
    spec = tmp_path / "list.yaml"
    spec.write_text(yaml.safe_dump({"train": str(listing), "val": str(listing), "names": ["x"] * 80}))
    ds = DetectionDataset(str(spec), SPLIT, SIZE, source=open_split("auto", spec, SPLIT, 80, "k"))
    assert len(ds) == 1 and "missing.jpg" in ds.skipped[0][0]
    twin = tmp_path / "twin"
    shutil.copytree(sets["images"], twin / "x")
    shutil.copytree(sets["images"], twin / "y")
    with pytest.raises(DatasetError, match="two images share the id"):
        build_dataset(DataConfig(root=str(twin), img_size=SIZE), SPLIT, 80)
