"""rtdetr_head (ultralytics' RTDETRDecoder on the neck's P3-P5) with its rtdetr_detection loss on real
coco128 images at 128 px: shapes, the loss and its gradients through head and neck, mAP through the
YOLO heads' DetectionScorer, and one Trainer epoch of configs/experiments/yolov8s_rtdetr_sam_coco128.yaml
with a live random SAM."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.datasets import DetectionDataset, collate_samples
from vfmkd.distillation.distiller import Distiller
from vfmkd.engine.builders import build_loss_terms, build_model
from vfmkd.engine.evaluation.evaluator import build_scorers
from vfmkd.engine.training.trainer import Trainer
from vfmkd.models.heads.rtdetr_head import RTDETRHead
from vfmkd.tasks import get_task
from vfmkd.tasks.scoring.detection_metrics import DetectionScorer

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "datasets" / "coco128"
EXPERIMENT = REPO / "configs" / "experiments" / "yolov8s_rtdetr_sam_coco128.yaml"
SIZE, QUERIES, LAYERS = 128, 20, 2
SMALL_HEAD = [f"model.heads.detection.num_queries={QUERIES}", f"model.heads.detection.num_decoder_layers={LAYERS}"]


@pytest.fixture(scope="module")
def cfg():
    return load_experiment(EXPERIMENT, SMALL_HEAD)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg["model"])


@pytest.fixture(scope="module")
def batch():
    ds = DetectionDataset(str(COCO), "train2017", img_size=SIZE, limit=3)
    return collate_samples([ds[0], ds[1], ds[2]])


def test_the_experiment_builds_a_yolov8s_with_an_rtdetr_head(model):
    head = model.heads["detection"]
    assert isinstance(head, RTDETRHead) and head.task == "detection" and head.num_classes == 80
    assert head.level_names == ["P3", "P4", "P5"] and head.decoder.num_queries == QUERIES
    assert head.decoder.num_decoder_layers == LAYERS


def test_train_and_eval_shapes(model, batch):
    model.train()
    out = model(batch.images)
    levels = out.heads["detection"]["feats"]
    assert [tuple(f.shape[-2:]) for f in levels] == [(16, 16), (8, 8), (4, 4)]
    model.eval()
    with torch.no_grad():
        pred, raw = model(batch.images).heads["detection"]
    assert pred.shape == (3, 4 + 80, QUERIES) and torch.isfinite(pred).all()
    assert raw["pred_boxes"].shape == (3, QUERIES, 4) and raw["pred_logits"].shape == (3, QUERIES, 80)
    assert ((pred[:, 4:] >= 0) & (pred[:, 4:] <= 1)).all()
    assert ((pred[:, :2] >= 0) & (pred[:, :2] <= SIZE)).all()  # centres in input pixels


def test_loss_is_finite_and_trains_head_and_neck(cfg, model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    terms = build_loss_terms({"det": {"type": "rtdetr_detection", "weight": 1.0}}, model, {}, {})
    result = Distiller(terms)(model(batch.images), batch, {})
    assert torch.isfinite(result.total) and result.logs["loss_det"] > 0
    parts = {k: result.logs[f"loss_det_{k}"] for k in ("cls", "l1", "giou")}
    assert sum(parts.values()) == pytest.approx(result.logs["loss_det"],
                                                rel=1e-5) and all(v > 0 for v in parts.values())
    result.total.backward()
    head = model.heads["detection"].decoder
    for name in ("input_proj.0.0.weight", "enc_score_head.weight", "dec_score_head.1.weight",
                 "dec_bbox_head.1.layers.2.weight", "denoising_class_embed.weight", "query_pos_head.layers.0.weight"):
        grad = head.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and bool((grad != 0).any()), name
    neck = [p.grad for p in model.neck.parameters() if p.requires_grad]
    assert all(g is not None for g in neck) and any(bool((g != 0).any()) for g in neck)
    assert any(p.grad is not None and bool((p.grad != 0).any()) for p in model.backbone.parameters())


def test_eval_output_plugs_into_the_detection_scorer(model, batch):
    """The head's eval layout through the unchanged DetectionScorer: the model's own output is
    scored, and queries placed on the ground truth (via the head's own conversion) score mAP50 1."""
    names = {i: str(i) for i in range(80)}
    scorers = build_scorers({"detection": "detection"}, names, None)
    assert isinstance(scorers["detection"], DetectionScorer)
    model.eval()
    with torch.no_grad():
        out = model(batch.images)
    scorers["detection"].update(out, batch)
    result = scorers["detection"].result()
    assert result["images"] == 3 and 0.0 <= result["mAP50"] <= 1.0 and np.isfinite(result["mAP50-95"])

    # Oracle: each image's ground-truth boxes as its first queries, the right class at logit 5.
    boxes = torch.full((3, QUERIES, 4), 0.5)
    boxes[..., 2:] = 0.01
    logits = torch.full((3, QUERIES, 80), -9.0)
    for i in range(3):
        cls, xywh = batch.boxes.of_image(i)
        n = min(len(cls), QUERIES)
        boxes[i, :n], logits[i, torch.arange(n), cls[:n].long()] = xywh[:n], 5.0
    pred = RTDETRHead.predictions(boxes, logits, torch.tensor([SIZE, SIZE]))
    oracle = DetectionScorer(names, conf=0.001, iou=0.7, max_det=300, read_output=get_task("detection").read_output)
    oracle.update(type(out)(out.backbone, out.neck, {"detection": (pred, {})}), batch)
    assert oracle.result()["mAP50"] == pytest.approx(1.0, abs=0.02)


def test_one_trainer_epoch_with_a_live_random_sam(tmp_path):
    cfg = load_experiment(EXPERIMENT, [
        "teachers.sam.offline=false", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
        f"work_dir={tmp_path}", "train.epochs=1", "data.limit=4", f"data.img_size={SIZE}", "data.batch_size=2",
        "data.num_workers=0", "eval.batch_size=4", "train.warmup_iters=1", "eval.vis_images=2", *SMALL_HEAD])
    trainer = Trainer(cfg, progress=False)
    metrics = trainer.fit()
    logs = metrics["epochs"][-1]["train"]
    for name in ("loss_det", "loss_det_cls", "loss_det_l1", "loss_det_giou", "loss_feat", "loss_task"):
        assert name in logs and np.isfinite(logs[name]), (name, sorted(logs))
    val = metrics["epochs"][-1]["val"]
    assert {"precision", "recall", "mAP50", "mAP50-95"} <= set(val["detection"])
    assert 0.0 <= val["detection"]["mAP50"] <= 1.0 and "mAP50" in val
    run = trainer.run_dir
    assert (run / "checkpoints" / "best.pt").is_file() and list((run / "checkpoints").glob("best_epoch1_mAP*.pt"))
    assert (run / "visualizations" / "epoch_001.png").is_file()


def test_onnx_export_compares_the_queries_as_a_set(model, tmp_path):
    """RT-DETR's output is an unordered set of queries: the export check matches them one to one."""
    from vfmkd.engine.export.exporter import export_onnx, matched_query_difference

    rng = np.random.default_rng(0)
    want = rng.random((2, 4 + 80, QUERIES)).astype(np.float32)
    want[:, :4] *= SIZE
    got = want[:, :, rng.permutation(QUERIES)]  # the same set in another order
    assert np.abs(got - want).max() > 1.0 and matched_query_difference(got, want, SIZE).max() == 0.0
    got[1, 4, 3] += 0.5  # one score of one query differs: the matched difference shows it
    assert matched_query_difference(got, want, SIZE).max() == pytest.approx(0.5)

    student = copy.deepcopy(model).eval()
    with torch.no_grad():  # encoder scores far apart, as a trained head's are (random ones tie)
        torch.nn.init.normal_(student.heads["detection"].decoder.enc_score_head.weight, std=0.3)
    diff = export_onnx(student, tmp_path / "rtdetr.onnx", SIZE)
    assert diff["max_scaled"] < 1e-4 and (tmp_path / "rtdetr.onnx").is_file()
