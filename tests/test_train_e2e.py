"""End to end on real coco128: cache -> train (offline distillation) -> evaluate, and the
training-side bad inputs (missing cache, cache of another teacher size, NaN loss)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import CacheMismatchError
from vfmkd.distillation.distiller import NonFiniteLossError
from vfmkd.engine.training.trainer import Trainer
from vfmkd.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402
from vfmkd.engine.commands import test as test_tool  # noqa: E402

pytestmark = pytest.mark.slow  # an end-to-end run of the tools: scheduled first (conftest)

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
TEACHER_SIZE, LIMIT = 128, 8


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "sam"
    args = ["--teacher", "sam", "--splits", "train2017", "--limit", str(LIMIT), "--batch-size", "4",
            "--output", str(out), "--no-progress", "teacher.init=random", f"teacher.input_size={TEACHER_SIZE}"]
    assert ptf.main(args) == 0
    return out


def overrides(features: Path, work_dir: Path, *extra: str) -> list[str]:
    return [
        f"teachers.sam.feature_path={features}", "teachers.sam.init=random", f"teachers.sam.input_size={TEACHER_SIZE}",
        f"data.limit={LIMIT}", "data.img_size=160", "data.batch_size=4", "data.num_workers=0",
        "train.lr=0.003", "train.warmup_iters=2", f"work_dir={work_dir}", "eval.batch_size=8", *extra,
    ]


def test_train_then_evaluate(features, tmp_path):
    cfg = load_experiment(EXPERIMENT, overrides(features, tmp_path, "train.epochs=4"))
    trainer = Trainer(cfg, progress=False)
    metrics = trainer.fit()
    run = trainer.run_dir
    assert run.parent == tmp_path / "yolov8_sam_coco128"
    for name in ("config.yaml", "train.log", "metrics.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "training_curves.png"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"
    train = [e["train"] for e in metrics["epochs"]]
    for epoch in train:
        assert all(np.isfinite(v) for v in epoch.values())
        assert {"loss", "loss_det", "loss_feat_distill_sam", "cos_sam"} <= set(epoch)
    # The student learns the teacher's features: the distillation loss falls, the cosine rises.
    assert train[-1]["loss_feat_distill_sam"] < 0.9 * train[0]["loss_feat_distill_sam"]
    assert train[-1]["cos_sam"] > train[0]["cos_sam"]
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["best_val"].keys() >= {"mAP50", "mAP50-95"}
    log = (run / "train.log").read_text()
    assert "cos_sam=" in log and "loss_feat_distill_sam=" in log
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    assert ckpt["config"]["teachers"]["sam"]["input_size"] == TEACHER_SIZE

    # tools/test.py on the run's own config writes mAP numbers into the run directory.
    assert test_tool.main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "best.pt"),
                           "--no-progress", "data.limit=8"]) == 0
    result = json.loads((run / "test_metrics_val2017.json").read_text())
    assert 0.0 <= result["mAP50-95"] <= result["mAP50"] <= 1.0 and result["images"] == 8


def test_missing_cache_names_the_command(tmp_path):
    cfg = load_experiment(EXPERIMENT, overrides(tmp_path / "nowhere", tmp_path))
    with pytest.raises(CacheMismatchError, match="prepare_teacher_features.py --teacher sam .*teacher.input_size=128"):
        Trainer(cfg, progress=False)


def test_cache_of_another_input_size_is_refused(features, tmp_path):
    cfg = load_experiment(EXPERIMENT, overrides(features, tmp_path, "teachers.sam.input_size=256"))
    with pytest.raises(CacheMismatchError, match="input_size: 128 != 256"):
        Trainer(cfg, progress=False)


def test_nan_in_the_cache_is_caught_when_read_not_blamed_on_the_lr(features, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(features, poisoned)
    with h5py.File(poisoned / "train2017.h5", "r+") as f:
        f["features/image_embeddings"][:] = np.nan
    cfg = load_experiment(EXPERIMENT, overrides(poisoned, tmp_path, "train.epochs=1"))
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(CacheMismatchError, match="(?s)non-finite value.*not a learning-rate "
                                                 "problem.*prepare_teacher_features"):
        trainer.fit()
    assert not (trainer.run_dir / "checkpoints" / "last.pt").exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_weights(features, tmp_path):
    cfg = load_experiment(EXPERIMENT, overrides(features, tmp_path, "train.epochs=1"))
    trainer = Trainer(cfg, progress=False)
    trainer.distiller.feature_losses["feature_mse"].compare = lambda *args: torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss_feat_distill_sam is nan"):
        trainer.fit()
    state = load_checkpoint(trainer.run_dir / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
