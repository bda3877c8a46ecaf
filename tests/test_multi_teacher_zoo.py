"""configs/experiments/yolov8s_sam2_dinov2_coco128.yaml end to end: SAM2 FPN levels to P3/P4,
DINOv2 patch tokens to P5 and its CLS token to pooled P5, both cached, one run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vfmkd.core.config import load_experiment
from vfmkd.engine.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8s_sam2_dinov2_coco128.yaml"


def test_sam2_and_dinov2_distil_into_one_student(tmp_path):
    common = ["--splits", "train2017", "--limit", "4", "--batch-size", "4", "--no-progress"]
    assert ptf.main(["--teacher", "sam2", "--output", str(tmp_path / "sam2"), "--features", "fpn_s8,fpn_s16", *common,
                     "teacher.init=random", "teacher.input_size=128"]) == 0
    assert ptf.main(["--teacher", "dinov2", "--output", str(tmp_path / "dinov2"), "--features",
                     "patch_tokens,cls_token",
                     *common, "teacher.init=random", "teacher.input_size=112"]) == 0
    cfg = load_experiment(EXPERIMENT, [
        f"teachers.sam2.feature_path={tmp_path / 'sam2'}", "teachers.sam2.init=random", "teachers.sam2.input_size=128",
        f"teachers.dinov2.feature_path={tmp_path / 'dinov2'}", "teachers.dinov2.init=random",
        "teachers.dinov2.input_size=112", "data.limit=4", "data.img_size=128", "data.batch_size=2",
        "data.num_workers=0", "train.epochs=1", f"work_dir={tmp_path}",
    ])
    trainer = Trainer(cfg, progress=False)
    assert all(src.live is None for src in trainer.router.sources.values())  # both cached, no model loaded
    levels = {n: m.student_level for n, m in trainer.distiller.feature_losses.items()}
    assert levels == {"sam2_p3": "P3", "sam2_p4": "P4", "dinov2_p5": "P5", "dinov2_cls": "P5"}
    metrics = trainer.fit()
    logs = metrics["epochs"][0]["train"]
    for key in ("loss_feat_distill_sam2_p3", "loss_feat_distill_sam2_p4", "loss_feat_distill_dinov2",
                "loss_feat_distill_dinov2_cls", "cos_dinov2", "cos_dinov2_cls", "loss_det"):
        assert np.isfinite(logs[key]), key
    assert metrics["best_val"] is not None
