"""DSRL resolution distillation (model.resolution_distill): shapes at each scale, the FA term is the
existing feature_affinity loss, loss_sr on a hand-made case, no SR parameter in the evaluated or
exported model, bad input, and a tiny training run that logs the terms and gives val mIoU."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vfmkd.core.config import experiment_from_dict, experiment_record
from vfmkd.core.errors import ConfigError
from vfmkd.distillation.losses.affinity import FeatureAffinityLoss
from vfmkd.distillation.resolution import ResolutionDistillLoss, build_resolution_term
from vfmkd.engine.builders import build_model
from vfmkd.engine.training.trainer import Trainer
from vfmkd.models.input_scale import check_input_geometry

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import export as export_tool  # noqa: E402


def config(tmp_path=None, img_size=128, heads=None, **rd):
    raw = {
        "experiment_name": "dsrl",
        "work_dir": str(tmp_path or "work_dirs"),
        "model": {"backbone": {"type": "regnet", "config": "configs/backbones/regnetx_002.yaml"},
                  "neck": {"type": "yolov8_pafpn", "depth": 1},
                  "heads": heads or {"semantic": {"type": "semantic_head", "num_classes": 130, "output_stride": 8}},
                  "resolution_distill": {"enabled": True, **rd}},
        "distillation": {"losses": {"semantic_segmentation": {"head": "semantic"}}, "standardize": False},
        "data": {"dataset": "coco128", "root": str(REPO / "datasets/coco128"), "img_size": img_size, "limit": 2,
                 "batch_size": 2, "num_workers": 0},
        "train": {"epochs": 1, "warmup_iters": 1, "vis_interval": 0, "device": "cpu"},
        "eval": {"fidelity": False, "batch_size": 4},
    }
    return experiment_from_dict(raw)


def term(cfg):
    exp = experiment_record(cfg)
    model = build_model(exp.model)
    return model, build_resolution_term(model, exp.model, exp.data.img_size)


@pytest.mark.parametrize("scale,low_res", [(2.0, False), (1.5, False), (1.2, True), (1.5, True)])
def test_shapes_at_each_scale(scale, low_res):
    S = 192  # 192 / 1.2, / 1.5, / 2 = 160, 128, 96: all multiples of 32
    model, (_, loss, head) = term(config(img_size=S, sr_target_scale=scale, use_low_res_sr=low_res))
    assert model.input_scale == scale and head == "semantic"
    images = torch.rand(1, 3, S, S)
    with torch.no_grad():
        out = model.eval()(images)
    s = round(S / scale)
    assert out.neck[loss.level].shape[-1] == s // 8  # the student ran on the downscaled input
    assert out.heads["semantic"].shape[-2:] == (s // 8, s // 8)
    with torch.no_grad():
        sr_image, sr_feats = loss.branch(out.neck[loss.level], (S, S))
    assert sr_image.shape == (1, 3, S, S)  # the canvas
    assert sr_feats.shape[-1] == (s // 8 if low_res else S) and sr_feats.shape[1] == 64
    assert loss.fa_grid((S, S)) == ((s, s) if low_res else (S, S))


def test_fa_is_the_existing_loss_and_sr_is_mse():
    torch.manual_seed(0)
    loss = ResolutionDistillLoss("P3", 16, 8, 2.0, feat_channels=8, sr_loss_weight=0.1, fa_loss_weight=1.0)
    level = torch.randn(2, 16, 4, 4)
    images = torch.rand(2, 3, 64, 64)
    total, items = loss(SimpleNamespace(neck={"P3": level}), SimpleNamespace(images=images))
    sr_image, sr_feats = loss.branch(level, (64, 64))
    # FA: the feature_affinity loss on the level resized to the SR grid (its own adapter) vs the SR features
    fa = FeatureAffinityLoss("sr", 16, 8, fa_subscale=0.125)
    fa.load_state_dict(loss.fa.state_dict())
    up = F.interpolate(level, size=(64, 64), mode="bilinear", align_corners=False)
    want_fa, _ = fa(up, sr_feats, torch.ones(2, 1, 64, 64))
    assert float(items["loss_fa"]) == pytest.approx(float(want_fa), rel=1e-4, abs=1e-6)
    assert float(items["loss_sr"]) == pytest.approx(float(((sr_image - images) ** 2).mean()), rel=1e-5)
    assert float(total) == pytest.approx(0.1 * float(items["loss_sr"]) + float(items["loss_fa"]), rel=1e-5)
    # loss_sr by hand: a branch that outputs a constant 0.5 against an image of 0 and 1 halves -> 0.25
    with torch.no_grad():
        for p in loss.branch.parameters():
            p.zero_()
        loss.branch.to_image.bias.fill_(0.5)
    half = torch.zeros(1, 3, 64, 64)
    half[..., 32:] = 1.0
    _, items = loss(SimpleNamespace(neck={"P3": level[:1]}), SimpleNamespace(images=half))
    assert float(items["loss_sr"]) == pytest.approx(0.25)


@pytest.mark.parametrize("key,value,words", [
    ("sr_target_scale", 1.0, "sr_target_scale must be in (1, 4]"),
    ("sr_target_scale", 4.5, "sr_target_scale must be in (1, 4]"),
    ("fa_subscale", 0.0, "fa_subscale must be in (0, 1]"),
    ("fa_subscale", 2.0, "fa_subscale must be in (0, 1]"),
])
def test_ranges(key, value, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("]", r"\]")):
        config(**{key: value})


def test_geometry_and_heads_are_checked():
    with pytest.raises(ConfigError) as exc:
        term(config(img_size=128, sr_target_scale=1.5))
    msg = str(exc.value)
    assert "85.33" in msg and "largest stride 32" in msg and "2 (64)" in msg and "384" in msg
    assert check_input_geometry(384, 1.2, 32) == 320
    det = {"detection": {"type": "yolo_head", "num_classes": 80}}
    with pytest.raises(ConfigError, match="needs a segmentation head"):  # box heads ride along, they do not suffice
        term(config(heads=det))
    prompt = {"semantic": {"type": "semantic_head", "num_classes": 130}, "promptable": {"type": "sam_decoder"}}
    with pytest.raises(ConfigError, match="input pixels"):
        term(config(heads=prompt))
    # Box and instance heads are built with canvas strides: their anchors, boxes and prototypes stay in the
    # canvas frame.
    both = {
        "semantic": {"type": "semantic_head", "num_classes": 130},
        "instance": {"type": "yolo_seg_head", "num_classes": 80},
    }
    seg_model = build_model(experiment_record(config(heads=both)).model)
    assert seg_model.heads["instance"].detect.stride.tolist() == [16.0, 32.0, 64.0]
    assert seg_model.heads["instance"].proto_stride == 8.0
    exp = experiment_record(config())
    model = build_model(exp.model)
    model.heads = torch.nn.ModuleDict()
    with pytest.raises(ConfigError, match="needs a segmentation head"):
        build_resolution_term(model, exp.model, 128)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    logging.getLogger("vfmkd").setLevel(logging.ERROR)
    tmp = tmp_path_factory.mktemp("dsrl")
    trainer = Trainer(config(tmp), progress=False)
    return trainer, trainer.fit()


def test_tiny_training_run_logs_terms_and_mIoU(run):
    trainer, metrics = run
    logs = metrics["epochs"][-1]["train"]
    for name in ("loss_sr", "loss_fa", "loss_resolution_distill", "loss_semantic"):
        assert name in logs and logs[name] == logs[name], (name, sorted(logs))
    assert logs["loss_resolution_distill"] == pytest.approx(0.1 * logs["loss_sr"] + logs["loss_fa"], rel=1e-4)
    assert logs["loss_task"] == pytest.approx(logs["loss_semantic"] + logs["loss_resolution_distill"], rel=1e-4)
    val = metrics["epochs"][-1]["val"]["semantic"]
    assert 0.0 <= val["mIoU"] <= 1.0
    # the SR branch trains in the distiller, not in the evaluated model
    assert any("branch" in k for k in trainer.distiller.state_dict())
    assert not any("branch" in k or "sr" in k.split(".") for k in trainer.model.state_dict())


def test_no_sr_parameters_in_the_export(run, tmp_path):
    trainer, _ = run
    best = next((trainer.run_dir / "checkpoints").glob("best.pt"))
    out = tmp_path / "student.torchscript"
    assert export_tool.main([str(best), "--format", "torchscript", "--output", str(out)]) == 0
    exported = torch.jit.load(str(out))
    keys = list(exported.state_dict())
    assert keys and not any("branch" in k or "fa." in k for k in keys)
    model = build_model(experiment_record(trainer.cfg).model)
    assert len(keys) == len(model.state_dict()) or sum(p.numel() for p in exported.parameters()) == \
        sum(p.numel() for p in model.parameters())
    images = torch.rand(1, 3, 128, 128)
    model.load_state_dict(trainer.model.state_dict())
    assert torch.allclose(exported(images), model.eval()(images).heads["semantic"], atol=1e-4)
