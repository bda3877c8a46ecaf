"""Dual-path resolution distillation (model.resolution_distill.mode: dual), the semantic head's learnable
fusion and multi-level feature entries: one dual training step (2 coco128 images) logs loss_sr /
loss_fa / loss_resolution_distill and both paths' task losses; evaluation, tools/test.py and export run at
full resolution by default and on the low path with model.infer_scale; bad inputs exit 2."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vfmkd.core.config import experiment_from_dict, experiment_record
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.distillation.distiller import Distiller
from vfmkd.engine.builders import build_model
from vfmkd.engine.builders.losses import build_loss_terms
from vfmkd.engine.commands import export as export_tool
from vfmkd.engine.commands import test as test_tool
from vfmkd.engine.training.fusion_log import log_fusion_weights
from vfmkd.engine.training.trainer import Trainer
from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
SEED_KEYS = {"feat_channels": 16, "sr_loss_weight": 0.5, "fa_loss_weight": 0.5, "fa_subscale": 0.0625}


def dual_config(tmp_path, img_size=128, **rd):
    raw = {
        "experiment_name": "dual", "work_dir": str(tmp_path),
        "model": {"backbone": {"type": "regnet", "config": "configs/backbones/regnetx_002.yaml"},
                  "neck": {"type": "fusion_fpn", "channels": 16},
                  "heads": {"semantic": {"type": "semantic_head", "num_classes": 130, "channels": 16}},
                  "resolution_distill": {"enabled": True, "mode": "dual", "sr_target_scale": 2.0, **SEED_KEYS,
                                         "task_weight_low": 0.5, **rd}},
        "distillation": {"losses": {"semantic_segmentation": {"head": "semantic"}}, "standardize": False},
        "data": {"dataset": "coco128", "root": str(REPO / "datasets/coco128"), "img_size": img_size, "limit": 2,
                 "batch_size": 2, "num_workers": 0},
        "train": {"epochs": 1, "warmup_iters": 1, "vis_interval": 0, "device": "cpu", "loggers": []},
        "eval": {"fidelity": False, "batch_size": 2},
    }
    return experiment_from_dict(raw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dual-mode Trainer after one training step (its logs) and its checkpoint (best.pt)."""
    logging.getLogger("vfmkd").setLevel(logging.ERROR)
    trainer = Trainer(dual_config(tmp_path_factory.mktemp("dual")), progress=False)
    trainer.model.train()
    logs = trainer.train_step(next(iter(trainer.train_loader)), 1)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.save("best.pt", 1, {"epoch": 1})
    return trainer, logs


def test_dual_step_logs_both_paths_and_the_three_losses(run):
    trainer, logs = run
    assert trainer.model.input_scale == 1.0  # the trained model is the full-resolution path
    for name in ("loss_sr", "loss_fa", "loss_resolution_distill", "loss_semantic_high", "loss_semantic_low"):
        assert name in logs and logs[name] == logs[name], (name, sorted(logs))
    assert logs["loss_resolution_distill"] == pytest.approx(0.5 * logs["loss_sr"] + 0.5 * logs["loss_fa"], rel=1e-4)
    assert logs["loss_semantic"] == pytest.approx(logs["loss_semantic_high"] + 0.5 * logs["loss_semantic_low"],
                                                  rel=1e-4)
    assert logs["loss_semantic_low"] != logs["loss_semantic_high"]  # the low path saw another input


def test_semantic_head_fusion_weights_are_logged(run):
    trainer, _ = run
    record, scalars = {"epoch": 1}, {}
    writer = SimpleNamespace(add_scalar=lambda tag, value, step: scalars.update({tag: value}))
    log_fusion_weights(trainer.model, record, writer)
    merge = record["head_fusion_weights"]["semantic"]["merge"]
    assert len(merge) == 3 and sum(merge) == pytest.approx(1.0, abs=1e-3)
    assert merge != [round(1 / 3, 6)] * 3  # learnable: the step moved them
    assert scalars["fusion/semantic.merge/P4"] == merge[1] and "fusion/P3_out/P3_in" in scalars  # head and neck


def test_the_low_path_runs_only_while_resolution_distill_is_in_the_stage(run):
    trainer, _ = run
    trainer.distiller.set_stage(["semantic_segmentation"])
    logs = trainer.train_step(next(iter(trainer.train_loader)), 1)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.distiller.set_stage(None)
    assert "loss_semantic_low" not in logs and "loss_sr" not in logs


def test_test_and_export_use_full_resolution_unless_infer_scale(run, tmp_path, monkeypatch):
    trainer, _ = run
    config, best = trainer.run_dir / "config.yaml", trainer.run_dir / "checkpoints" / "best.pt"
    # every inference tool builds the student with build_model: full resolution unless model.infer_scale
    assert build_model(experiment_record(trainer.cfg).model).input_scale == 1.0
    out = tmp_path / "student.torchscript"
    assert export_tool.main([str(best), str(config), "--format", "torchscript", "--output", str(out),
                             "model.infer_scale=0.5"]) == 0
    images = torch.rand(1, 3, 128, 128)
    assert torch.jit.load(str(out))(images).shape[-1] == 8  # stride-8 logits of the 64-pixel low path
    import vfmkd.engine.evaluation.tester as tester

    built = []
    monkeypatch.setattr(tester, "build_model", lambda m: built.append(build_model(m)) or built[-1])
    assert test_tool.main([str(config), str(best), "--no-progress", "--fidelity", "off", "model.infer_scale=0.5"]) == 0
    metrics = json.loads((trainer.run_dir / "test_metrics_val2017.json").read_text())
    assert 0.0 <= metrics["semantic"]["mIoU"] <= 1.0 and [m.input_scale for m in built] == [2.0]
    # a scale that leaves the coarsest level (stride 32) without a cell: one message, exit 2
    args = [str(config), str(best), "--no-progress", "--fidelity", "off", "model.infer_scale=0.125"]
    with pytest.raises(ConfigError, match="smaller than one cell"):
        test_tool.main(args)
    assert run_tool(test_tool.main, args) == 2


@pytest.mark.parametrize("rd,words", [
    ({"mode": "duall"}, "mode must be single or dual"),
    ({"task_weight_low": -1.0}, "task_weight_high and task_weight_low must be >= 0"),
])
def test_bad_dual_keys(tmp_path, rd, words):
    with pytest.raises(ConfigError, match=words):
        dual_config(tmp_path, **rd)


def test_a_scale_below_one_cell_is_refused(tmp_path):
    from vfmkd.distillation.resolution import build_resolution_term

    exp = experiment_record(dual_config(tmp_path, img_size=96, sr_target_scale=4.0))
    with pytest.raises(ConfigError, match="smaller than one cell.*stride 32"):
        build_resolution_term(build_model(exp.model, training=True), exp.model, exp.data.img_size)
    with pytest.raises(ConfigError, match=r"model.infer_scale must be in \(0, 1\]"):
        experiment_from_dict({**dual_config(tmp_path), "model": {**dual_config(tmp_path)["model"], "infer_scale": 2}})


def test_seed_keys_as_written_and_fa_detach_high(tmp_path):
    from vfmkd.distillation.resolution import ResolutionDistillLoss, build_resolution_term

    exp = experiment_record(dual_config(tmp_path, feat_channels=128))
    _, loss, head = build_resolution_term(build_model(exp.model, training=True), exp.model, exp.data.img_size)
    assert (loss.dual, loss.sr_loss_weight, loss.fa_loss_weight, loss.fa.pool, loss.fa_detach_high, head) == \
        (True, 0.5, 0.5, 16, True, "semantic")
    assert loss.branch.stem.conv.out_channels == 128 and loss.low_heads == ("semantic",)
    for detach in (True, False):  # FA's gradient reaches the high path only with fa_detach_high: false
        torch.manual_seed(0)
        fa = ResolutionDistillLoss("P3", 8, 8, 2.0, feat_channels=4, fa_subscale=0.25, dual=True, fa_detach_high=detach)
        high, low = torch.randn(1, 8, 8, 8, requires_grad=True), torch.randn(1, 8, 4, 4, requires_grad=True)
        out = SimpleNamespace(neck={"P3": high}, low=SimpleNamespace(neck={"P3": low}))
        total, items = fa(out, SimpleNamespace(images=torch.rand(1, 3, 64, 64)))
        total.backward()
        assert low.grad is not None and (high.grad is None) == detach and float(items["loss_fa"]) > 0


SAM2 = {"sam2": [FeatureSpec("fpn_s4", 256, 4), FeatureSpec("fpn_s8", 256, 8), FeatureSpec("fpn_s16", 256, 16)]}


@pytest.fixture(scope="module")
def student():
    return build_model({"backbone": {"type": "regnet", "config": "configs/backbones/regnetx_002.yaml"},
                        "neck": {"type": "yolov8_pafpn", "depth": 1},
                        "heads": {"semantic": {"type": "semantic_head", "num_classes": 3, "channels": 8}}})


def test_multi_level_entry_pairs_by_stride_and_names_each_pair(student):
    entry = {"type": "feature_mse", "teacher": "sam2", "teacher_features": ["fpn_s8", "fpn_s16"], "weight": 0.5}
    terms = build_loss_terms({"feat": entry}, student, SAM2, {"sam2": "fpn_s16"})
    assert [(t.name, t.log_name, t.module.teacher_feature, t.module.student_level, t.weight, t.parent)
            for t in terms] == [("feat_P3", "loss_feat_distill_sam2_P3", "fpn_s8", "P3", 0.5, "feat"),
                                ("feat_P4", "loss_feat_distill_sam2_P4", "fpn_s16", "P4", 0.5, "feat")]
    explicit = {**entry, "teacher_features": ["fpn_s4", "fpn_s8", "fpn_s16"], "student_levels": ["P3", "P4", "P5"],
                "log_as": "sam_fpn"}
    terms = build_loss_terms({"feat": explicit}, student, SAM2, {"sam2": "fpn_s16"})
    assert [t.log_name for t in terms] == ["sam_fpn_P3", "sam_fpn_P4", "sam_fpn_P5"]
    distiller = Distiller(terms)
    distiller.set_stage(["feat"], {"feat": 2.0})  # a stage names the entry: all its pairs
    assert distiller.active == {"feat_P3", "feat_P4", "feat_P5"} and set(distiller.weights.values()) == {2.0}


@pytest.mark.parametrize("change,words", [
    ({"teacher_features": ["fpn_s4", "fpn_s8"]}, r"no level for fpn_s4 \(stride 4\).*student_levels: \[P3, P4\]"),
    ({"student_levels": ["P3"]}, "names 2 maps.*1 levels.*one level per map"),
    ({"student_levels": ["P3", "P9"]}, r"\['P9'\] are not levels"),
    ({"student_levels": ["P3", "P3"]}, "uses a level twice"),
    ({"teacher_feature": "fpn_s8"}, "no teacher_feature / student_level"),
])
def test_multi_level_mistakes_name_the_fix(student, change, words):
    entry = {"type": "feature_mse", "teacher": "sam2", "teacher_features": ["fpn_s8", "fpn_s16"], **change}
    with pytest.raises(ConfigError, match=words):
        build_loss_terms({"feat": entry}, student, SAM2, {"sam2": "fpn_s16"})
