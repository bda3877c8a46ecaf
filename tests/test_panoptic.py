"""Panoptic output (vfmkd/datasets/panoptic.py, vfmkd/engine/evaluation/panoptic_quality.py): ground truth read from the
COCO panoptic PNGs, inconsistent annotations skipped with their reason, PQ/SQ/RQ against a case worked
out by hand with panopticapi's formula, the things-then-stuff merger, and the scorer end to end."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vfmkd.core.errors import ConfigError
from vfmkd.datasets.coco_yolo import DetectionDataset
from vfmkd.datasets.masks import SemanticClassTable
from vfmkd.datasets.panoptic import PanopticAnnotationError, PanopticAnnotations, rgb_to_id
from vfmkd.datasets.records import Batch, BatchViews, DetectionBatch, ViewGeometry, collate_samples
from vfmkd.engine.evaluation.evaluator import build_scorers, evaluate, primary_metric
from vfmkd.engine.evaluation.panoptic_quality import (
    UNASSIGNED,
    MergeRule,
    PanopticMeter,
    PanopticScorer,
    merge_panoptic,
)
from vfmkd.models.unified_model import StudentOutput, UnifiedModel
from vfmkd.tasks import get_task

SPLIT = "val2017"
IMAGES = ("000000000139", "000000000285", "000000000632")


# ------------------------------------------------------------------------------------ ground truth
def test_ground_truth_matches_segments_info_and_the_semantic_png(coco128):
    ann = PanopticAnnotations(coco128, SPLIT)
    assert len(ann) == 100 and len(ann.things) == 80 and len(ann.stuffs) == 53
    table = SemanticClassTable.load(coco128)
    for image_id in IMAGES:
        gt = ann.load(image_id)
        with Image.open(coco128 / "images" / SPLIT / f"{image_id}.jpg") as im:
            assert gt.ids.shape == (im.height, im.width)
        assert gt.areas() == {sid: s.area for sid, s in gt.segments.items()}  # pixel counts = the JSON's 'area'
        assert {s.isthing for s in gt.segments.values()} == {True, False}
        for s in gt.segments.values():
            assert s.isthing == ann.categories[s.category_id].isthing
        # the semantic PNG (category id per pixel) is the panoptic PNG's categories; contiguous index likewise
        raw = np.asarray(Image.open(coco128 / "semantic_segmentation" / "masks" / SPLIT / f"{image_id}.png"))
        assert np.array_equal(gt.category_map(), raw)
        assert np.array_equal(gt.semantic_index(table), table.encode(raw, Path("x")))
        pair = gt.metric_input()
        assert pair.shape == (*gt.ids.shape, 2) and np.array_equal(pair[..., 1] > 0, pair[..., 0] > 0)


def broken_root(coco128: Path, tmp_path: Path) -> Path:
    """A dataset root whose panoptic val JSON has one good image and two inconsistent ones."""
    root = tmp_path / "root"
    for sub in ("instance_segmentation", "semantic_segmentation", "object_detection"):
        (root / sub).mkdir(parents=True)
        shutil.copy(coco128 / sub / "config.yaml", root / sub / "config.yaml")
    pan = root / "panoptic_segmentation"
    (pan / "annotations" / "png").mkdir(parents=True)
    (pan / "config.yaml").write_text(yaml.safe_dump({"val": {"images": "../images/val2017", "masks": "annotations/png",
                                                             "annotations": "annotations/val.json"}}))
    data = json.loads((coco128 / "panoptic_segmentation" / "annotations" / "panoptic_val2017.json").read_text())
    keep = {int(i) for i in IMAGES}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = sorted((a for a in data["annotations"] if a["image_id"] in keep), key=lambda a: a["image_id"])
    for a in data["annotations"]:
        shutil.copy(coco128 / "panoptic_segmentation" / "annotations" / "panoptic_val2017" / a["file_name"],
                    pan / "annotations" / "png" / a["file_name"])
    data["annotations"][1]["segments_info"].append({"id": 999, "category_id": 1, "iscrowd": 0, "area": 5,
                                                    "bbox": [0, 0, 1, 1]})  # listed, not in the PNG
    dropped = data["annotations"][2]["segments_info"].pop(0)  # in the PNG, not listed
    (pan / "annotations" / "val.json").write_text(json.dumps(data))
    return root, dropped["id"]


def test_inconsistent_annotations_are_named_with_their_reason(coco128, tmp_path):
    root, dropped = broken_root(coco128, tmp_path)
    ann = PanopticAnnotations(root, SPLIT)  # the entry 'val' is found by its images folder 'val2017'
    assert ann.load(IMAGES[0]).segments
    with pytest.raises(PanopticAnnotationError, match=r"segments_info id\(s\) \[999\] missing from the PNG"):
        ann.load(IMAGES[1])
    with pytest.raises(PanopticAnnotationError, match=rf"segment id\(s\) \[{dropped}\] without a segments_info entry"):
        ann.load(IMAGES[2])


def letterbox(orig_hw, size: int) -> ViewGeometry:
    h, w = orig_hw
    r = size / max(h, w)
    ox, oy = (size - w * r) / 2, (size - h * r) / 2
    return ViewGeometry(matrix=np.array([[r, 0.0, ox], [0.0, r, oy]]), affine=(r, r, ox, oy),
                        content_box=(int(round(ox)), int(round(oy)), int(round(ox + w * r)), int(round(oy + h * r))),
                        orig_hw=(h, w))


def test_scorer_skips_counts_and_names_inconsistent_images_once(coco128, tmp_path, caplog):
    root, _ = broken_root(coco128, tmp_path)
    ann = PanopticAnnotations(root, SPLIT)
    size, n = 64, len(IMAGES)
    views = [letterbox(ann.load(IMAGES[0]).ids.shape, size)] * n  # only image 0's size matters: the others are skipped
    batch = Batch(images=torch.zeros(n, 3, size, size), image_ids=list(IMAGES) + [], views=BatchViews.stack(views),
                  boxes=DetectionBatch(torch.zeros(0, 1), torch.zeros(0, 4), torch.zeros(0)))
    preds = torch.zeros(n, 4 + 80 + 32, 10)  # no detection scores: no things
    proto = torch.zeros(n, 32, 16, 16)
    instance = ((preds, proto), {"proto": proto, "mask_coefficient": preds[:, -32:]})  # ultralytics' eval layout
    out = StudentOutput(backbone={}, neck={}, heads={"instance": instance,
                                                      "semantic": torch.zeros(n, 130, 8, 8)})
    scorer = PanopticScorer("instance", "semantic", root, SPLIT, {i: str(i) for i in range(80)},
                            read_instance=get_task("instance").read_output,
                            read_semantic=get_task("semantic").read_output)
    with caplog.at_level(logging.WARNING, logger="vfmkd"):
        scorer.update(out, batch)
        scorer.update(out, batch)  # a second pass (epoch) logs nothing new
    warned = [r.getMessage() for r in caplog.records if "panoptic: image" in r.getMessage()]
    assert len(warned) == 2 and all(any(i in m for m in warned) for i in IMAGES[1:])
    result = scorer.result()
    assert result["skipped"] == 2 and set(result["skipped_images"]) == set(IMAGES[1:])
    assert "missing from the PNG" in result["skipped_images"][IMAGES[1]]
    assert result["images"] == 2  # image 0, twice
    # everything predicted void (unlabeled argmax, no instance): every segment a false negative
    assert result["PQ"] == 0.0 and result["RQ"] == 0.0
    assert all(v["FN"] > 0 and v["TP"] == 0 for v in result["per_class_pq"].values())


# ------------------------------------------------------------------------------------ PQ by hand
PERSON, CAR, SKY, GRASS = 1, 2, 10, 11


def hand_case():
    """6 x 8 ground truth (segment id per pixel, 0 void) and merged prediction (ids 1..4, 0 void)."""
    gt = np.zeros((6, 8), np.int64)
    gt[0:3, 0:3] = 1  # person A, 9 px
    gt[0:2, 6:8] = 2  # person B, 4 px
    gt[3:6, 0:4] = 3  # sky, 12 px
    gt[3:6, 4:8] = 4  # grass, 12 px; rows 0-2 cols 3-5 and row 2 cols 6-7 stay void (11 px)
    gt_cat = {0: 0, 1: PERSON, 2: PERSON, 3: SKY, 4: GRASS}
    pred = np.zeros((6, 8), np.int64)
    pred[0:3, 1:4] = 1  # person, 9 px: 6 on A, 3 on void
    pred[0:2, 6:8] = 2  # car on person B
    pred[3:6, 0:5] = 3  # sky, 15 px: 12 on sky, 3 on grass
    pred[4:6, 5:8] = 4  # grass, 6 px on grass; 14 px predicted void, 3 of them on A and 3 on grass
    pred_cat = {0: UNASSIGNED, 1: PERSON, 2: CAR, 3: SKY, 4: GRASS}

    def pairs(ids, cats):
        return torch.from_numpy(np.stack([np.vectorize(cats.get)(ids), ids], -1))

    return pairs(pred, pred_cat), pairs(gt, gt_cat)


# panopticapi, by hand (union = pred + gt - intersection - pred on GT void; IoU > 0.5 matches):
#   person A x pred person: I 6, U 9 + 9 - 6 - 3 = 9, IoU 2/3 -> TP; person B unmatched -> FN
#   car: pred on person B, no car in GT -> FP
#   sky: I 12, U 15 + 12 - 12 = 15, IoU 0.8 -> TP
#   grass: I 6, U 6 + 12 - 6 = 12, IoU 0.5 (not > 0.5) -> FP and FN
# per class (PQ, SQ, RQ): person (4/9, 2/3, 2/3), car (0, 0, 0), sky (0.8, 0.8, 1), grass (0, 0, 0)
HAND = {"PQ": (4 / 9 + 0.8) / 4, "SQ": (2 / 3 + 0.8) / 4, "RQ": (2 / 3 + 1) / 4,
        "PQ_things": 2 / 9, "SQ_things": 1 / 3, "RQ_things": 1 / 3, "PQ_stuff": 0.4, "SQ_stuff": 0.4, "RQ_stuff": 0.5}


@pytest.mark.parametrize("exact", [True, False], ids=["torchmetrics-update", "segment_stats"])
def test_pq_by_hand_with_panopticapi_formula(exact):
    pred, gt = hand_case()
    meter = PanopticMeter([PERSON, CAR], [SKY, GRASS], {PERSON: "person", CAR: "car", SKY: "sky", GRASS: "grass"},
                          exact=exact)
    meter.update(pred, gt)
    result = meter.result()
    for key, value in HAND.items():
        assert result[key] == pytest.approx(value), key
    assert result["per_class_pq"]["person"] == pytest.approx(
        {"PQ": 4 / 9, "SQ": 2 / 3, "RQ": 2 / 3, "TP": 1, "FP": 0, "FN": 1, "thing": True})
    assert result["per_class_pq"]["grass"] == pytest.approx(
        {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "TP": 0, "FP": 1, "FN": 1, "thing": False})
    assert result["categories"] == 4 and result["categories_things"] == 2


def test_torchmetrics_own_void_would_excuse_predicted_void():
    """Why predicted void is UNASSIGNED: as torchmetrics void (an unknown category) the 3 void pixels on
    person A and on grass leave their unions (person IoU 6/6, grass 6/9 > 0.5): not panopticapi."""
    from torchmetrics.detection import PanopticQuality

    pred, gt = hand_case()
    pred[..., 0][pred[..., 0] == UNASSIGNED] = 0
    metric = PanopticQuality({PERSON, CAR}, {SKY, GRASS}, allow_unknown_preds_category=True, return_sq_and_rq=True)
    pq = metric(pred[None], gt[None])
    assert float(pq[0]) != pytest.approx(HAND["PQ"])
    assert float(pq[0]) == pytest.approx(((1.0 * 2 / 3) + 0 + 0.8 + 2 / 3) / 4)  # person SQ 1, grass TP at 2/3
    # with no predicted void the two agree: the meter is torchmetrics' number
    full, target = hand_case()
    full[..., 0][full[..., 0] == UNASSIGNED] = SKY
    full[..., 1][full[..., 0] == SKY] = 3
    meter = PanopticMeter([PERSON, CAR], [SKY, GRASS])
    meter.update(full, target)
    plain = PanopticQuality({PERSON, CAR}, {SKY, GRASS}, return_sq_and_rq=True)(full[None], target[None])
    mine = meter.result()
    assert [mine["PQ"], mine["SQ"], mine["RQ"]] == pytest.approx(plain.tolist())


def test_segment_stats_equal_torchmetrics_update_on_a_real_image(coco128):
    """The fast per-image statistics are torchmetrics' own on a real panoptic PNG against a damaged copy
    (a thing relabelled, a stuff shifted, a region predicted void, crowd void in the target)."""
    ann = PanopticAnnotations(coco128, SPLIT)
    gt = ann.load("000000000285")  # a bear on grass and trees, downsized for the slow reference path
    target = torch.from_numpy(gt.metric_input())[::4, ::4].contiguous()
    pred = target.clone()
    pred[..., 0][target[..., 0] == 0] = UNASSIGNED
    pred[: pred.shape[0] // 3, :, 0] = UNASSIGNED  # the top third unassigned
    pred[..., 1] = torch.roll(pred[..., 1], 7, dims=1)
    pred[..., 0] = torch.roll(pred[..., 0], 7, dims=1)
    things = sorted(ann.things)
    pred[..., 0][pred[..., 0] == things[0]] = things[1]
    results = []
    for exact in (True, False):
        meter = PanopticMeter(things, sorted(ann.stuffs), exact=exact)
        meter.update(pred, target)
        results.append((meter.metric.iou_sum.clone(), meter.metric.true_positives.clone(),
                        meter.metric.false_positives.clone(), meter.metric.false_negatives.clone()))
    assert torch.allclose(results[0][0], results[1][0]) and all(
        torch.equal(a, b) for a, b in zip(results[0][1:], results[1][1:])
    )
    assert int(results[0][1].sum()) > 0 and int(results[0][3].sum()) > 0


# ------------------------------------------------------------------------------------ merger
def test_merger_things_over_stuff_by_score_overlap_and_area():
    h = w = 100
    semantic = torch.full((h, w), GRASS)
    semantic[:20, :] = SKY
    semantic[0:5, 0:5] = 0  # unlabeled
    semantic[60:70, 60:70] = PERSON  # a thing pixel of the semantic map no instance covers -> void
    semantic[90:95, 90:95] = SKY  # 25 px of sky, kept: same category as the big region, one segment
    semantic[80:84, 0:4] = CAR + 100  # 16 px of a stuff class below stuff_area -> void
    masks = torch.zeros(4, h, w, dtype=torch.bool)
    masks[0, 10:40, 10:40] = True  # person 0.9: over sky and grass
    masks[1, 15:45, 15:45] = True  # person 0.8: (25*25)/(30*30) = 69 % taken -> dropped
    masks[2, 30:50, 30:60] = True  # car 0.7: 100 of 600 px taken (17 %) -> keeps its 500 free px
    masks[3, 70:90, 70:90] = True  # person 0.3 < 0.5 -> dropped
    scores = torch.tensor([0.9, 0.8, 0.7, 0.3])
    cats = torch.tensor([PERSON, PERSON, CAR, PERSON])
    out = merge_panoptic(masks, scores, cats, semantic, {SKY, GRASS, CAR + 100}, MergeRule(stuff_area=20))
    segs = {s.id: s for s in out.segments}
    # sky: 2000 px (25 unlabeled, 25 added at 90:95) - 300 under person; grass: 8000 - 100 semantic person - 25 sky
    # - 16 small stuff - 600 under person - 500 car
    assert [(s.category_id, s.isthing, s.area) for s in out.segments] == [
        (PERSON, True, 900), (CAR, True, 500), (SKY, False, 1700), (GRASS, False, 6759)]
    assert (out.ids[10:40, 10:40] == 1).all() and (out.ids[40:50, 30:60] == 2).all()
    assert segs[3].category_id == SKY and out.ids[92, 92] == 3
    assert out.ids[65, 65] == 0 and out.ids[2, 2] == 0 and out.ids[81, 1] == 0  # thing pixel, unlabeled, small stuff
    assert out.ids[80, 80] == 4  # under the dropped low-score instance: grass
    pairs = out.metric_input()
    assert pairs[65, 65].tolist() == [UNASSIGNED, 0] and pairs[20, 20].tolist() == [PERSON, 1]
    none = merge_panoptic(torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0), torch.zeros(0), semantic,
                          {SKY, GRASS})
    assert [s.category_id for s in none.segments] == [GRASS]  # default stuff_area 4096: sky (2000 px) is too small


def test_merge_rule_and_missing_head_errors(coco128):
    with pytest.raises(ConfigError, match="overlap_threshold"):
        MergeRule(overlap_threshold=1.5)
    names = {i: str(i) for i in range(80)}
    with pytest.raises(ConfigError, match=r"needs a semantic head .*has: instance \(instance\)"):
        build_scorers({"instance": "instance"}, names, None, data_root=coco128, split=SPLIT, panoptic=True)
    with pytest.raises(ConfigError, match="needs an instance head"):
        build_scorers({"semantic": "semantic"}, names, {0: "u", 1: "x"}, data_root=coco128, split=SPLIT, panoptic=True)
    assert "panoptic" not in build_scorers({"instance": "instance"}, names, None, data_root=coco128, split=SPLIT)


# ------------------------------------------------------------------------------------ end to end
def test_scorer_end_to_end_on_val_images(coco128, tmp_path):
    torch.manual_seed(0)
    size = 256
    ds = DetectionDataset(str(coco128), SPLIT, img_size=size, limit=3, instances=True, semantic=True)
    model = UnifiedModel.from_config({
        "backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
        "heads": {"instance": {"type": "yolo_seg_head", "num_classes": 80},
                  "semantic": {"type": "semantic_head", "num_classes": ds.semantic_num_classes}}})
    tasks = {"instance": "instance", "semantic": "semantic"}
    names = {i: str(i) for i in range(80)}
    scorers = build_scorers(tasks, names, dict(enumerate(ds.semantic_table.names)), data_root=ds.root, split=SPLIT)
    assert isinstance(scorers["panoptic"], PanopticScorer)
    pan = scorers["panoptic"]
    pan.rule = MergeRule(score_threshold=0.0, stuff_area=64)  # untrained: let low-score instances through
    pan.max_det, pan.draw_to = 5, tmp_path / "visualizations" / "test_panoptic_000.png"
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_samples)
    result = evaluate(model, loader, {"panoptic": pan}, torch.device("cpu"), progress=False)["panoptic"]
    for key in ("PQ", "SQ", "RQ", "PQ_things", "SQ_things", "RQ_things", "PQ_stuff", "SQ_stuff", "RQ_stuff"):
        assert math.isfinite(result[key]) and 0.0 <= result[key] <= 1.0, key
    assert result["images"] == 3 and result["skipped"] == 0 and result["unlabelled"] == 0
    assert result["categories_things"] > 0 and result["categories_stuff"] > 0 and result["per_class_pq"]
    assert pan.written == [pan.draw_to] and pan.draw_to.stat().st_size > 0
    with Image.open(pan.draw_to) as im:
        assert im.size[0] > im.size[1] > 0
    # PQ picks best.pt for a model scored on panoptic labels (best_epoch{E}_PQ{value}.pt)
    both = {"instance": {"mask_mAP50-95": 0.3}, "semantic": {"mIoU": 0.2}, "panoptic": dict(result, PQ=0.25)}
    assert primary_metric(both, tasks) == ("panoptic", "PQ", 0.25, 0.25, "PQ0.2500")
    assert primary_metric({k: both[k] for k in tasks}, tasks)[:3] == ("instance", "mask_mAP50-95", 0.3)


def test_rgb_to_id():
    rgb = np.array([[[1, 2, 3], [0, 0, 0]]], np.uint8)
    assert rgb_to_id(rgb).tolist() == [[1 + 2 * 256 + 3 * 65536, 0]]
