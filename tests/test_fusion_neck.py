"""fusion_fpn (issue 9, item 1): EfficientDet's fast normalised fusion on hand-set parameters, sum and
avg, every student's P3-P5, gradients into the fusion parameters, a bad fusion name, and the learned
weights in a training run's metrics.json."""
from __future__ import annotations

import json

import pytest
import torch

import vfmkd.models  # noqa: F401  (registers the built-in components)
from vfmkd.core.config import experiment_from_dict
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import BACKBONES, NECKS
from vfmkd.engine.training.trainer import Trainer
from vfmkd.models.necks.fusion_fpn import EPS, FusionFPN, WeightedFusion

SPECS = (FeatureSpec("P3", 8, 8), FeatureSpec("P4", 16, 16), FeatureSpec("P5", 32, 32))


def test_fast_normalised_fusion_on_hand_set_parameters():
    fuse = WeightedFusion(3, "learnable")
    assert torch.equal(fuse.p.detach(), torch.ones(3))  # initialised equal
    with torch.no_grad():
        fuse.p.copy_(torch.tensor([2.0, -1.0, 0.5]))  # the negative one is clipped to 0 by relu
    x = [torch.full((1, 1, 2, 2), v) for v in (1.0, 10.0, 100.0)]
    expected = (2.0 * 1.0 + 0.0 * 10.0 + 0.5 * 100.0) / (EPS + 2.5)
    assert torch.allclose(fuse(x), torch.full((1, 1, 2, 2), expected))
    w = fuse.weights().detach()
    assert torch.allclose(w, torch.tensor([2.0, 0.0, 0.5]) / (EPS + 2.5))
    assert w[1] == 0 and w.sum() == pytest.approx(1.0, abs=1e-4)

    assert torch.allclose(WeightedFusion(3, "sum")(x), torch.full((1, 1, 2, 2), 111.0))
    assert torch.allclose(WeightedFusion(3, "avg")(x), torch.full((1, 1, 2, 2), 37.0))
    assert not list(WeightedFusion(3, "sum").parameters()) and not list(WeightedFusion(2, "avg").parameters())


def test_fusion_weights_names_and_defaults():
    neck = FusionFPN(SPECS, channels=16)
    assert neck.fusion_inputs() == {"P4_td": ["P4_in", "P5_in"], "P3_out": ["P3_in", "P4_td"],
                                    "P4_out": ["P4_in", "P4_td", "P3_out"], "P5_out": ["P5_in", "P4_out"]}
    w = neck.fusion_weights()
    assert w["P4_out"] == pytest.approx([1 / (3 + EPS)] * 3) and w["P5_out"] == pytest.approx([1 / (2 + EPS)] * 2)
    assert FusionFPN(SPECS, fusion="sum").fusion_weights()["P4_out"] == [1.0, 1.0, 1.0]
    assert FusionFPN(SPECS, fusion="avg").fusion_weights()["P3_out"] == [0.5, 0.5]
    assert [s for s in neck.feature_specs()] == [FeatureSpec(s.name, 16, s.stride) for s in SPECS]


# The P3-P5 specs the students declare (yolov8 n, regnet regnetx_002, repvit_m0_9); the neck on the real
# backbones (and ViT's equal widths, RegNet at 4/8/16) is in tests/test_model_contracts.py.
STUDENT_SPECS = {
    "yolov8n": ((64, 8), (128, 16), (256, 32)),
    "regnetx_002": ((56, 8), (152, 16), (368, 32)),
    "repvit_m0_9": ((96, 8), (192, 16), (384, 32)),
}


@pytest.mark.parametrize("student", sorted(STUDENT_SPECS))
def test_every_student_p3_p5_and_gradients_reach_the_fusion_parameters(student):
    torch.manual_seed(0)
    specs = [FeatureSpec(f"P{i + 3}", c, s) for i, (c, s) in enumerate(STUDENT_SPECS[student])]
    neck = NECKS.build("fusion_fpn", in_specs=specs, channels=32).train()
    out = neck({s.name: torch.randn(2, s.channels, 96 // s.stride, 128 // s.stride) for s in specs})
    for spec, (name, f) in zip(neck.feature_specs(), out.items()):
        assert name == spec.name and f.shape == (2, 32, 96 // spec.stride, 128 // spec.stride)
    sum((f * torch.randn_like(f)).sum() for f in out.values()).backward()
    for node, fuse in neck.fuse.items():
        assert fuse.p.grad is not None and torch.isfinite(fuse.p.grad).all() and fuse.p.grad.abs().sum() > 0, node
    missing = [n for n, p in neck.named_parameters() if p.grad is None]
    assert not missing


def test_specs_match_the_students():
    bb = BACKBONES.build("yolov8", variant="n")
    assert tuple((s.channels, s.stride) for s in bb.feature_specs()) == STUDENT_SPECS["yolov8n"]


def test_unknown_fusion_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown fusion 'learned'.*learnable, sum, avg.*Did you mean 'learnable'"):
        NECKS.build("fusion_fpn", where="model.neck", in_specs=SPECS, fusion="learned")
    with pytest.raises(ConfigError, match="two or more levels"):
        FusionFPN(SPECS[:1])


def test_training_run_records_the_fusion_weights(tmp_path):
    """RegNet + fusion_fpn + YOLO head, no teacher: 1 epoch on 2 coco128 images at 128 px."""
    cfg = experiment_from_dict({
        "experiment_name": "fusion_tiny",
        "model": {"backbone": {"type": "regnet", "variant": "regnetx_002"},
                  "neck": {"type": "fusion_fpn", "channels": 32, "fusion": "learnable"},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 80}}},
        "distillation": {"losses": {"detection": {"weight": 1.0}}},
        "data": {"dataset": "coco128", "img_size": 128, "batch_size": 2, "num_workers": 0, "limit": 2},
        "train": {"epochs": 1, "lr": 0.01, "optimizer": "adamw", "warmup_iters": 0, "vis_interval": 0},
        "eval": {"batch_size": 2, "fidelity": False},
    }, [f"work_dir={tmp_path}"])
    trainer = Trainer(cfg, progress=False)
    before = {n: f.p.detach().clone() for n, f in trainer.model.neck.fuse.items()}
    trainer.fit()
    metrics = json.loads((trainer.run_dir / "metrics.json").read_text())
    weights = metrics["epochs"][0]["fusion_weights"]
    assert set(weights) == {"P4_td", "P3_out", "P4_out", "P5_out"} and len(weights["P4_out"]) == 3
    assert weights == trainer.model.neck.fusion_weights()
    assert all(0.0 <= w <= 1.0 for ws in weights.values() for w in ws)
    # the optimizer trained them
    assert any(not torch.equal(before[n], f.p.detach()) for n, f in trainer.model.neck.fuse.items())
    events = list(trainer.run_dir.rglob("events.out.tfevents*"))
    assert events, "no TensorBoard events"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "fusion/P4_out/P3_out" in acc.Tags()["scalars"]
