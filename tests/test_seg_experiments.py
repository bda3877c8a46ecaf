"""The segmentation experiments of configs/experiments end to end on real coco128, at a small size:
cache (features + box-prompted SAM masks) -> train -> validate -> checkpoints and pictures -> tools/test.py,
and a vfmkd run as the teacher of another student."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfmkd.core.config import load_experiment
from vfmkd.engine.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402
from vfmkd.engine.commands import test as test_tool  # noqa: E402

EXPERIMENTS = REPO / "configs" / "experiments"
SIZE, LIMIT = 128, 4
SMALL = [f"data.limit={LIMIT}", f"data.img_size={SIZE}", "data.batch_size=2", "data.num_workers=0", "eval.batch_size=4",
         "train.warmup_iters=1", "eval.vis_images=2"]
# Live-teacher runs: no held-out fidelity, channel statistics or pictures (each costs extra teacher passes;
# the cached instance run covers them).
LEAN = ["eval.fidelity=false", "distillation.standardize=false", "train.vis_interval=0"]


def finite_logs(metrics, *names):
    logs = metrics["epochs"][-1]["train"]
    for name in names:
        assert name in logs and np.isfinite(logs[name]), (name, sorted(logs))
    return logs


@pytest.fixture(scope="module")
def sam_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "sam"
    for split in ("train2017", "val2017"):
        assert ptf.main(["--teacher", "sam", "--splits", split, "--limit", str(LIMIT), "--batch-size", "2",
                         "--output", str(out), "--outputs", "features,masks", "--no-progress",
                         "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    return out


@pytest.fixture(scope="module")
def instance_run(sam_cache, tmp_path_factory) -> Path:
    """yolov8n_seg_sam_coco128: detection + instance heads, cached SAM features and mask logits."""
    work = tmp_path_factory.mktemp("work")
    cfg = load_experiment(EXPERIMENTS / "yolov8n_seg_sam_coco128.yaml", [
        f"teachers.sam.feature_path={sam_cache}", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
        f"work_dir={work}", "train.epochs=2", "train.save_period=1", "train.vis_interval=2", *SMALL])
    trainer = Trainer(cfg, progress=False)
    metrics = trainer.fit()
    logs = finite_logs(metrics, "loss_mask_distill", "loss_instance", "loss_det", "loss_task", "loss_kd", "loss_feat",
                       "loss_distill_sam")
    assert logs["loss_mask_distill"] > 0
    # every batch read the cache (features and masks): no live teacher was needed
    assert trainer.router.sources["sam"].live is None
    val = metrics["epochs"][-1]["val"]
    assert {"mask_mAP50", "mask_mAP50-95", "mAP50-95"} <= set(val["instance"]) and "mAP50" in val["detection"]
    return trainer.run_dir


def test_instance_experiment_checkpoints_and_pictures(instance_run):
    ckpts = instance_run / "checkpoints"
    assert (ckpts / "last.pt").is_file() and (ckpts / "best.pt").is_file()
    assert (ckpts / "checkpoint_epoch1.pt").is_file() and (ckpts / "checkpoint_epoch2.pt").is_file()
    named = list(ckpts.glob("best_epoch*_maskmAP*.pt"))
    assert len(named) == 1, named
    for name in ("epoch_002.png", "epoch_002_pca.png"):
        with Image.open(instance_run / "visualizations" / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    assert not (instance_run / "visualizations" / "epoch_001.png").exists()  # vis_interval=2


def test_tools_test_writes_results_and_samples(instance_run):
    assert test_tool.main([str(instance_run / "config.yaml"), str(instance_run / "checkpoints" / "best.pt"),
                           "--no-progress"]) == 0
    text = (instance_run / "test_results_val2017.txt").read_text()
    assert "mask_mAP50-95" in text and "mAP50" in text
    assert (instance_run / "visualizations" / "test_sample_000.png").is_file()
    assert (instance_run / "test_metrics_val2017.json").is_file()


def test_semantic_experiment_live_sam(tmp_path):
    """regnet_semantic_sam_coco128 with a live SAM: feature + class + mask distillation, mIoU."""
    cfg = load_experiment(EXPERIMENTS / "regnet_semantic_sam_coco128.yaml", [
        "teachers.sam.offline=false", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
        f"work_dir={tmp_path}", "train.epochs=1", *SMALL, *LEAN])
    metrics = Trainer(cfg, progress=False).fit()
    logs = finite_logs(metrics, "loss_mask_distill", "loss_cls_distill", "loss_feat_distill", "loss_semantic",
                       "loss_distill_sam")
    assert logs["loss_mask_distill"] > 0
    val = metrics["epochs"][-1]["val"]["semantic"]
    assert 0.0 <= val["mIoU"] <= 1.0 and val["per_class_iou"]
    assert list((tmp_path / "regnet_semantic_sam_coco128").glob("*/checkpoints/best_epoch1_mIoU*.pt"))


def test_binary_lora_sam_experiment(tmp_path):
    """lora_sam_binary_person_coco128 (random LoRA-SAM, live): alpha/beta/gamma, KL at T=4, Dice + HD95."""
    cfg = load_experiment(EXPERIMENTS / "lora_sam_binary_person_coco128.yaml", [
        "teachers.lora_sam.offline=false", "teachers.lora_sam.init=random", "teachers.lora_sam.lora_checkpoint=null",
        f"teachers.lora_sam.input_size={SIZE}", f"work_dir={tmp_path}", "train.epochs=1", "train.warmup_epochs=0",
        "data.limit=6", *SMALL[1:], *LEAN])
    metrics = Trainer(cfg, progress=False).fit()
    logs = finite_logs(metrics, "loss_kl_distill", "loss_binary", "loss_feat_distill_lora_sam")
    assert logs["loss"] == pytest.approx(0.5 * logs["loss_task"] + 0.5 * logs["loss_kd"] + 0.1 * logs["loss_feat"],
                                         rel=1e-4)
    val = metrics["epochs"][-1]["val"]["binary"]
    assert {"dice", "iou", "hd95", "pixel_accuracy"} <= set(val)


def test_vfmkd_run_teaches_another_student(instance_run, tmp_path):
    """yolov8n_from_yolov8s_coco128 with the instance run above as the (live) teacher: class scores."""
    cfg = load_experiment(EXPERIMENTS / "yolov8n_from_yolov8s_coco128.yaml", [
        f"teachers.yolov8s.checkpoint={instance_run / 'checkpoints' / 'best.pt'}", f"work_dir={tmp_path}",
        "train.epochs=1", *SMALL, *LEAN])
    metrics = Trainer(cfg, progress=False).fit()
    logs = finite_logs(metrics, "loss_cls_distill", "loss_feat_distill_yolov8s", "loss_det")
    assert logs["loss_cls_distill"] >= 0


def test_mask_distill_from_a_features_only_cache_names_the_command(tmp_path):
    out = tmp_path / "sam"
    assert ptf.main(["--teacher", "sam", "--splits", "train2017", "--limit", "2", "--batch-size", "2", "--output",
                     str(out),
                     "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    cfg = load_experiment(EXPERIMENTS / "yolov8n_seg_sam_coco128.yaml", [
        f"teachers.sam.feature_path={out}", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
        f"work_dir={tmp_path}", "train.epochs=1", *SMALL[1:], "data.limit=2"])
    with pytest.raises(Exception, match=r"--outputs features,masks") as info:
        Trainer(cfg, progress=False)
    assert "mask_distill" in str(info.value)
