"""Instance polygons, semantic and binary masks on real coco128: geometry shared with the boxes,
class tables, unlabelled images and the bad-input errors."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfmkd.core.errors import DatasetError
from vfmkd.datasets.coco_yolo import DetectionDataset
from vfmkd.datasets.masks import InstanceClassTable, SemanticClassTable, clip_polygon
from vfmkd.datasets.records import collate_samples
from vfmkd.datasets.transforms import GeometricAugment

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "datasets" / "coco128"
SPLIT = "train2017"
S = 160
PERSON_IMAGE = 4  # 000000000036: a person (panoptic 1) and an umbrella, portrait 481x640
AUG = GeometricAugment(fliplr=0.5, scale=0.4, translate=0.2)


def seg_dataset(root: Path = COCO, **kw) -> DetectionDataset:
    kw.setdefault("limit", 6)
    return DetectionDataset(str(root), SPLIT, img_size=S, instances=kw.pop("instances", True),
                            semantic=kw.pop("semantic", True), binary_classes=kw.pop("binary_classes", ("person",)),
                            **kw)


def make_root(tmp_path: Path, n: int = 3) -> Path:
    """A tmp copy of the first n coco128 train images with every label kind and the class tables."""
    root = tmp_path / "ds"
    parts = {"object_detection/labels": ".txt", "instance_segmentation/labels": ".txt",
             "semantic_segmentation/masks": ".png"}
    (root / "images" / SPLIT).mkdir(parents=True)
    for folder in parts:
        (root / folder / SPLIT).mkdir(parents=True)
    for cfg in ("object_detection", "instance_segmentation", "semantic_segmentation"):
        shutil.copy(COCO / cfg / "config.yaml", root / cfg / "config.yaml")
    for img in sorted((COCO / "images" / SPLIT).glob("*.jpg"))[:n]:
        shutil.copy(img, root / "images" / SPLIT / img.name)
        for folder, suffix in parts.items():
            shutil.copy(COCO / folder / SPLIT / f"{img.stem}{suffix}", root / folder / SPLIT / f"{img.stem}{suffix}")
    return root


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _xyxy(cxcywh: torch.Tensor, scale: float) -> np.ndarray:
    cx, cy, w, h = (cxcywh.double() * scale).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).numpy()


def test_class_tables_map_by_name():
    table = InstanceClassTable.load(COCO, 80)
    assert table.names[51] == "bowl" and table.to_detection[51] == 45  # panoptic 51 'bowl' -> detection 45
    assert table.to_detection[1] == 0 and table.to_detection[90] == 79 and len(table.to_detection) == 80
    sem = SemanticClassTable.load(COCO)
    assert sem.ids[0] == 0 and sem.names[1] == "person" and sem.num_classes == 130
    assert list(sem.indices_of(["person"])) == [1]
    raw = np.array([[0, 1], [51, 200]], np.uint8)
    assert sem.encode(raw, Path("x.png")).tolist() == [[0, 1], [sem.ids.index(51), 129]]
    # image 000000000009 holds bowls (panoptic 51): they arrive as detection class 45, matched to the
    # detection label rows of class 45
    ds = seg_dataset(limit=1)
    s = ds[0]
    assert (s.instances.cls == 45).sum() == 3
    rows = s.instances.label_index
    assert (rows >= 0).all()
    assert torch.equal(s.instances.cls, torch.from_numpy(ds.labels[0][rows.numpy(), 0]))
    assert ds.semantic_num_classes == 130


def test_polygon_clipping():
    square = np.array([[-10.0, -10.0], [50.0, -10.0], [50.0, 50.0], [-10.0, 50.0]])
    clipped = clip_polygon(square, 40)
    assert clipped.min(0).tolist() == [0.0, 0.0] and clipped.max(0).tolist() == [40.0, 40.0]
    assert len(clip_polygon(square + 100, 40)) == 0


def test_masks_follow_boxes_under_augmentation():
    ds = seg_dataset(augment=AUG, seed=3)
    checked = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            inst = s.instances
            assert inst.masks.shape[1:] == (S // 4, S // 4) and inst.masks.dtype == torch.uint8
            assert inst.masks.max() <= 1
            # label_index survives the augmentation's drops: each kept box is its label-file row
            assert torch.equal(s.boxes.cls, torch.from_numpy(ds.labels[i][s.boxes.label_index.numpy(), 0]))
            boxes = _xyxy(inst.boxes, S / 4)  # in mask pixels
            for k in range(len(inst.cls)):
                ys, xs = np.nonzero(inst.masks[k].numpy())
                if len(xs):  # every mask pixel lies inside the instance's box (cv2.fillPoly also
                    x1, y1, x2, y2 = boxes[k]  # paints pixels its outline touches: 1 pixel slack)
                    assert xs.min() + 0.5 >= x1 - 1 and xs.max() + 0.5 <= x2 + 1
                    assert ys.min() + 0.5 >= y1 - 1 and ys.max() + 0.5 <= y2 + 1
                    # and spans it (a thin part under half a mask pixel may vanish at S/4)
                    assert xs.min() <= x1 + 2 and xs.max() + 1 >= x2 - 2
                    assert ys.min() <= y1 + 2 and ys.max() + 1 >= y2 - 2
                    checked += 1
                row = int(inst.label_index[k])
                if row >= 0 and row in s.boxes.label_index.tolist():  # its detection box, same view
                    j = s.boxes.label_index.tolist().index(row)
                    assert s.boxes.cls[j] == inst.cls[k]
                    a, b = boxes[k], _xyxy(s.boxes.boxes[j], S / 4)
                    inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
                    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
                    assert inter / union > 0.4
            # the semantic map and the image share the view: padding is 114 grey / 255 ignore together
            pad = s.binary == 255
            assert (s.semantic[pad] == 0).all()
            grey = (s.image * 255 - 114).abs().amax(0) < 1
            assert (grey | ~pad).float().mean() > 0.99 or not pad.any()
    assert checked > 30


def test_flip_mirrors_masks_exactly():
    plain = seg_dataset(limit=PERSON_IMAGE + 1)
    flipped = seg_dataset(limit=PERSON_IMAGE + 1, augment=GeometricAugment(fliplr=1.0))
    for i in (0, PERSON_IMAGE):
        a, b = plain[i], flipped[i]
        assert b.view.flipped and torch.equal(a.instances.cls, b.instances.cls)
        for k in range(len(a.instances.cls)):
            ma, mb = a.instances.masks[k].numpy().astype(bool), b.instances.masks[k].numpy().astype(bool)
            if ma.sum() > 50:  # small masks differ by their rounding along the outline
                assert _iou(np.fliplr(ma), mb) > 0.93
        assert (torch.flip(a.semantic, [1]) == b.semantic).float().mean() > 0.99
        assert (torch.flip(a.binary, [1]) == b.binary).float().mean() > 0.99
        fa = a.instances.boxes.clone()
        fa[:, 0] = 1 - fa[:, 0]
        assert torch.allclose(fa, b.instances.boxes, atol=1 / S)  # letterbox rounds its width, a flip does not


def test_semantic_person_overlaps_person_instance():
    for augment in (None, AUG):
        ds = seg_dataset(limit=PERSON_IMAGE + 1, augment=augment, seed=1)
        s = ds[PERSON_IMAGE]
        person = s.instances.cls == 0
        assert person.any()
        inst = s.instances.masks[person].amax(0).numpy().astype(bool)  # (S/4, S/4)
        sem = (s.semantic == 1).numpy()  # contiguous index 1 = person
        sem4 = sem.reshape(S // 4, 4, S // 4, 4).mean((1, 3)) >= 0.5
        assert _iou(inst, sem4) > 0.9  # 0.96-0.99 on coco128
        assert np.array_equal(s.binary.numpy() == 1, sem)  # binary person == semantic person


def test_binary_masks_alone():
    ds = seg_dataset(limit=PERSON_IMAGE + 1, instances=False, semantic=False)
    s = ds[PERSON_IMAGE]
    assert s.semantic is None and s.instances is None and ds.kinds == ("binary",)
    assert s.binary.shape == (S, S) and s.binary.dtype == torch.uint8
    assert set(s.binary.unique().tolist()) == {0, 1, 255}  # person, rest, letterbox padding
    x1, y1, x2, y2 = s.view.content_box  # portrait: padding left and right
    assert (s.binary[:, :x1] == 255).all() and (s.binary[:, x2:] == 255).all()
    assert (s.binary[:, x1 + 1:x2 - 1] != 255).all()
    batch = collate_samples([ds[i] for i in range(2)])
    assert batch.semantic is None and batch.instances is None and batch.binary.shape == (2, S, S)
    assert collate_samples([DetectionDataset(str(COCO), SPLIT, img_size=S, limit=1)[0]]).binary is None


def _collate_and_report_sharing(samples):
    batch = collate_samples(samples)
    return batch, [t.is_shared() for t in (batch.images, batch.semantic, batch.binary)]


def test_a_worker_stacks_images_and_dense_labels_into_shared_memory():
    # a DataLoader worker's batch reaches the main process through shared memory: stacked there directly, the
    # images and label maps are not copied a second time on the way
    ds = seg_dataset(limit=2, instances=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=_collate_and_report_sharing)
    batch, shared = next(iter(loader))
    assert all(shared), shared
    same = collate_samples([ds[0], ds[1]])
    assert torch.equal(batch.images, same.images) and torch.equal(batch.semantic, same.semantic)
    assert not same.images.is_shared()  # outside a worker: ordinary memory


def test_unlabelled_images_are_counted_and_collated(tmp_path, caplog):
    root = make_root(tmp_path, 3)
    ids = sorted(p.stem for p in (root / "images" / SPLIT).iterdir())
    (root / "instance_segmentation" / "labels" / SPLIT / f"{ids[1]}.txt").unlink()
    (root / "semantic_segmentation" / "masks" / SPLIT / f"{ids[2]}.png").unlink()
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        ds = seg_dataset(root, limit=None)
    assert ds.unlabelled == {"instances": [ids[1]], "semantic": [ids[2]], "binary": [ids[2]]}
    lines = [r.getMessage() for r in caplog.records if "without labels" in r.getMessage()]
    assert len(lines) == 1 and "instances 1" in lines[0] and "semantic 1" in lines[0]
    samples = [ds[i] for i in range(3)]
    assert samples[1].instances is None and samples[2].semantic is None and samples[2].binary is None
    batch = collate_samples(samples)
    assert batch.instances.labelled.tolist() == [True, False, True]
    assert not (batch.instances.batch_idx == 1).any()
    assert (batch.semantic[2] == 0).all() and (batch.binary[2] == 255).all()
    assert batch.semantic.dtype == torch.int64 and batch.binary.dtype == torch.uint8
    # only unlabelled images: the fields are still there, all ignore
    only = collate_samples([samples[1]])
    assert only.instances.labelled.tolist() == [False] and only.instances.masks.shape == (0, S // 4, S // 4)
    only = collate_samples([samples[2]])
    assert (only.semantic == 0).all() and (only.binary == 255).all()
    # ultralytics' v8SegmentationLoss input (overlap_mask=False): one (S/4, S/4) mask per instance row
    loss_in = batch.instances.as_loss_input()
    assert set(loss_in) == {"cls", "bboxes", "batch_idx", "masks"}
    n = len(batch.instances)
    assert loss_in["cls"].shape == (n, 1) and loss_in["bboxes"].shape == (n, 4) and loss_in["batch_idx"].shape == (n,)
    assert loss_in["masks"].shape == (n, S // 4, S // 4) and loss_in["masks"].dtype == torch.float32
    assert torch.equal(loss_in["masks"][batch.instances.batch_idx == 2], samples[2].instances.masks.float())
    moved = batch.to(torch.device("cpu"))
    assert moved.instances is not None and moved.semantic is not None and moved.binary is not None
    assert moved.boxes.label_index.dtype == torch.int64


def test_polygon_class_outside_table(tmp_path):
    root = make_root(tmp_path, 1)
    label = next((root / "instance_segmentation" / "labels" / SPLIT).iterdir())
    lines = label.read_text().splitlines()
    lines[1] = "12 " + lines[1].split(" ", 1)[1]  # 12 is no panoptic thing id
    label.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{label.name}:2: polygon class id 12 .*instance_segmentation/config.yaml"):
        seg_dataset(root)
    lines[1] = "51 0.1 0.2 0.3 0.4 0.5 0.6 0.7"
    label.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{label.name}:2: odd number of polygon coordinates"):
        seg_dataset(root)


def test_mask_of_another_size(tmp_path):
    root = make_root(tmp_path, 1)
    mask = next((root / "semantic_segmentation" / "masks" / SPLIT).iterdir())
    Image.open(mask).resize((320, 240), Image.NEAREST).save(mask)
    with pytest.raises(DatasetError) as err:
        seg_dataset(root, instances=False)
    msg = str(err.value)
    assert str(mask) in msg and "320x240" in msg and f"{mask.stem}.jpg" in msg and "640x480" in msg


def test_unknown_binary_class(tmp_path):
    with pytest.raises(DatasetError, match=r"\['persn'\].*Did you mean 'person'.*Valid names: person, bicycle"):
        seg_dataset(instances=False, semantic=False, binary_classes=["persn"], limit=1)


def test_no_mask_labels_at_all(tmp_path):
    root = make_root(tmp_path, 2)
    shutil.rmtree(root / "instance_segmentation" / "labels")
    with pytest.raises(DatasetError, match=r"instance segmentation head with no mask "
                                           r"labels.*instance_segmentation/labels/train2017"):
        seg_dataset(root, semantic=False, binary_classes=())
    for png in (root / "semantic_segmentation" / "masks" / SPLIT).iterdir():
        png.unlink()
    with pytest.raises(DatasetError, match=r"semantic segmentation head with no mask "
                                           r"labels.*semantic_segmentation/masks/train2017"):
        seg_dataset(root, instances=False)
    with pytest.raises(DatasetError, match=r"binary segmentation head with no mask labels"):
        seg_dataset(root, instances=False, semantic=False)
    DetectionDataset(str(root), SPLIT, img_size=S)  # detection alone still loads
