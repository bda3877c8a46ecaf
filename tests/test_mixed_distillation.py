"""Online / mixed / multi-teacher distillation and the memory levers, on real coco128 images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import ConfigError
from vfmkd.distillation.routing import offline_draw
from vfmkd.distillation.targets import QuantizedMap
from vfmkd.engine.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
SIZE, LIMIT = 128, 8


@pytest.fixture(scope="module")
def flip_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "sam_flip"
    args = ["--teacher", "sam", "--splits", "train2017", "--limit", str(LIMIT), "--batch-size", "4", "--with-flip",
            "--output", str(out), "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]
    assert ptf.main(args) == 0
    return out


def base(features: Path, work_dir: Path, *extra: str) -> list[str]:
    return [
        f"teachers.sam.feature_path={features}", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
        f"data.limit={LIMIT}", "data.img_size=160", "data.batch_size=2", "data.num_workers=0", "train.epochs=1",
        "train.lr=0.003", "train.warmup_iters=2", f"work_dir={work_dir}", "eval.batch_size=8",
        "eval.fidelity=false",  # held-out fidelity has its own tests (test_engine); here it would be live SAM passes
        *extra,
    ]


def test_offline_draw_is_reproducible_and_respects_the_pure_modes():
    def run(ratio, seed):
        return ["offline" if offline_draw(seed, step, 0) < ratio else "online" for step in range(200)]

    assert run(0.8, 1) == run(0.8, 1) and run(0.8, 1) != run(0.8, 2)
    assert 0.7 < run(0.8, 1).count("offline") / 200 < 0.9
    assert set(run(1.0, 0)) == {"offline"} and set(run(0.0, 0)) == {"online"}


def test_offline_ratio_outside_unit_interval_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="within \\[0, 1\\]"):
        load_experiment(EXPERIMENT, ["distillation.offline_ratio=1.2", f"work_dir={tmp_path}"])


def test_pure_offline_does_not_load_the_teacher(flip_cache, tmp_path):
    trainer = Trainer(load_experiment(EXPERIMENT, base(flip_cache, tmp_path, "data.augment.fliplr=0.5")),
                      progress=False)
    assert trainer.router.sources["sam"].live is None  # flips are served by the cached flipped pass
    trainer.fit()
    assert trainer.router.summary()["sam"] == {"offline": LIMIT // 2}


def test_mixed_run_with_augmentation_counts_and_routes_batches(flip_cache, tmp_path):
    cfg = load_experiment(EXPERIMENT, base(
        flip_cache, tmp_path, "distillation.offline_ratio=0.5", "data.augment.fliplr=0.5",
        "data.augment.scale=0.3", "data.augment.translate=0.1", "train.epochs=2",
        # routing by the draw alone here; the geometric gates have their own test below
        "distillation.offline_crops=true", "distillation.offline_max_shift=1.0"))
    trainer = Trainer(cfg, progress=False)
    assert trainer.router.sources["sam"].live is not None
    metrics = trainer.fit()
    counts = trainer.router.summary()["sam"]
    assert counts["offline"] + counts["online"] == 2 * LIMIT // 2
    assert counts["offline"] > 0 and counts["online"] > 0
    for epoch in metrics["epochs"]:
        assert np.isfinite(epoch["train"]["loss_feat_distill_sam"])
    assert "teacher sam batches so far" in (trainer.run_dir / "train.log").read_text()


def test_rotation_forces_the_live_teacher_and_says_why(flip_cache, tmp_path):
    cfg = load_experiment(EXPERIMENT, base(flip_cache, tmp_path, "data.augment.degrees=20"))
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    counts = trainer.router.summary()["sam"]
    assert counts.get("offline", 0) == 0
    assert any("rotated view" in k for k in counts)


def test_crops_and_large_shifts_go_to_the_live_teacher(flip_cache, tmp_path):
    cfg = load_experiment(EXPERIMENT,
                          base(flip_cache, tmp_path, "data.augment.translate=0.4", "data.augment.scale=0.5"))
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    reasons = [k for k in trainer.router.summary()["sam"] if k.startswith("online: ")]
    assert any("crops the image" in r or "view moved" in r for r in reasons), reasons


def test_two_teachers_each_with_its_own_level_mode_and_standardisation(flip_cache, tmp_path):
    cfg = load_experiment(EXPERIMENT, base(
        flip_cache, tmp_path, "distillation.distill_interval=2", "train.accumulate=2", "train.amp=true",
        "+teachers.sam_big.type=sam", "teachers.sam_big.offline=false", "teachers.sam_big.init=random",
        "teachers.sam_big.input_size=192",
        "distillation.losses.feature_mse.student_level=P4",
        "+distillation.losses.big_cosine.type=feature_cosine", "distillation.losses.big_cosine.teacher=sam_big",
        "distillation.losses.big_cosine.student_level=P5", "distillation.losses.big_cosine.weight=0.5"))
    trainer = Trainer(cfg, progress=False)
    assert trainer.router.sources["sam_big"].live is not None and trainer.router.sources["sam"].live is None
    assert set(trainer.distiller._stats) == {("sam", "image_embeddings"), ("sam_big", "image_embeddings")}
    metrics = trainer.fit()
    logs = metrics["epochs"][0]["train"]
    assert {"cos_sam", "cos_sam_big", "loss_feat_distill_sam", "loss_feat_distill_sam_big"} <= set(logs)
    summary = trainer.router.summary()
    # distill_interval=2: a teacher pass on every other of the 4 steps
    assert summary["sam"] == {"offline": 2} and summary["sam_big"]["online"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_two_losses_logging_the_same_name_are_refused(flip_cache, tmp_path):
    cfg = load_experiment(EXPERIMENT, base(
        flip_cache, tmp_path, "+distillation.losses.again.type=feature_cosine",
        "distillation.losses.again.teacher=sam"))
    with pytest.raises(ConfigError, match="both log as 'loss_feat_distill_sam'.*log_as"):
        Trainer(cfg, progress=False)


def test_images_missing_from_the_cache_go_online_when_configured(tmp_path):
    partial = tmp_path / "partial"
    assert ptf.main(["--teacher", "sam", "--splits", "train2017", "--limit", "4", "--batch-size", "4", "--output",
                     str(partial), "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    with pytest.raises(Exception, match="4 of 8 images"):
        Trainer(load_experiment(EXPERIMENT, base(partial, tmp_path)), progress=False)
    trainer = Trainer(load_experiment(EXPERIMENT, base(partial, tmp_path, "distillation.missing_cache=online")),
                      progress=False)
    assert trainer.router.sources["sam"].live is not None
    trainer.fit()
    counts = trainer.router.summary()["sam"]
    assert counts["online"] >= 2 and counts.get("online: images missing from the cache", 0) >= 2


def test_training_reads_an_int8_cache_and_dequantises_on_the_device(tmp_path):
    out = tmp_path / "int8"
    assert ptf.main(["--teacher", "sam", "--splits", "train2017", "--limit", str(LIMIT), "--storage", "int8",
                     "--output", str(out), "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    trainer = Trainer(load_experiment(EXPERIMENT, base(out, tmp_path)), progress=False)
    item = next(iter(trainer.train_loader))
    packed = item.cached["sam"].features["image_embeddings"]
    assert isinstance(packed, QuantizedMap) and packed.values.dtype == torch.int8
    logs = trainer.train_one_epoch(1)
    assert np.isfinite(logs["loss_feat_distill_sam"]) and logs["cos_sam"] > -1
