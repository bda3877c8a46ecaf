"""A distillation loss defined outside vfmkd (docs/adding_a_loss.md), named from YAML through
custom_imports, trains without any change to vfmkd."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.engine.training.trainer import Trainer

HERE = Path(__file__).resolve().parent / "custom_components"
EXPERIMENT = HERE / "tiny_convnet_charbonnier.yaml"


def test_external_loss_trains_two_steps(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # the user's package is on PYTHONPATH, not in vfmkd
    cfg = load_experiment(EXPERIMENT, [f"work_dir={tmp_path}"])
    trainer = Trainer(cfg, progress=False)
    (term,) = [t for t in trainer.distiller.terms.values() if t.kind == "feature"]
    assert type(term.module).__name__ == "FeatureCharbonnierLoss" and term.module.eps == 0.01
    assert term.weight == 2.0 and term.log_name == "loss_feat_distill_sam2"
    adapter = [p.detach().clone() for p in term.module.adapter.parameters()]
    logs = trainer.train_one_epoch(1)  # 4 images, batch 2: two steps
    assert trainer.step == 2
    assert np.isfinite(logs["loss_feat_distill_sam2"]) and logs["loss_feat_distill_sam2"] > 0
    assert np.isfinite(logs["cos_sam2"])
    # the optimizer trains the custom loss's adapter: it is part of the run, not a detached module
    assert any(not torch.equal(a, p) for a, p in zip(adapter, term.module.adapter.parameters()))


def test_external_loss_value_and_key_checks(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    import my_vfmkd_ext.charbonnier_loss  # noqa: F401  (registers feature_charbonnier)
    loss = LOSSES.build("feature_charbonnier", where="t", teacher="sam", student_channels=2, teacher_channels=2,
                        eps=0.5)
    with torch.no_grad():
        loss.adapter.proj.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        loss.adapter.proj.bias.zero_()
    student = torch.tensor([[[[3.0]], [[0.0]]]])  # d = (3, 0) at one location
    value, cosine = loss(student, torch.zeros(1, 2, 1, 1), torch.ones(1, 1, 1, 1))
    expected = ((9 + 0.25) ** 0.5 - 0.5 + 0.0) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # the registry checks the user's YAML keys against the constructor, as for vfmkd's own losses
    with pytest.raises(ConfigError, match="epz.*Did you mean 'eps'"):
        LOSSES.check_kwargs("feature_charbonnier", {"epz": 0.1}, "distillation.losses.charbonnier")
    with pytest.raises(ConfigError, match="eps must be > 0"):
        LOSSES.build("feature_charbonnier", where="t", teacher="sam", student_channels=2, teacher_channels=2, eps=0.0)


OUTPUT_EXPERIMENT = HERE / "tiny_convnet_mask_dice.yaml"


def test_external_output_loss_trains_two_steps(tmp_path, monkeypatch):
    """An output loss and its pairing, registered in one file outside vfmkd, train an instance head
    from a live (random-init) SAM's box-prompted masks on coco128."""
    monkeypatch.syspath_prepend(str(HERE))
    cfg = load_experiment(OUTPUT_EXPERIMENT, [f"work_dir={tmp_path}"])
    trainer = Trainer(cfg, progress=False)
    (term,) = [t for t in trainer.distiller.terms.values() if t.kind == "output"]
    assert type(term.module).__name__ == "MaskDiceDistillLoss" and term.module.temperature == 2.0
    assert term.head == "instance" and term.teacher == "sam" and term.log_name == "loss_mask_dice"
    assert term.pairing.rule.source == "masks" and term.pairing.needs_masks  # the SAM passes prompt for masks
    proto = [p.detach().clone() for p in trainer.model.heads["instance"].detect.proto.parameters()]
    logs = trainer.train_one_epoch(1)  # 4 images, batch 2: two steps
    assert trainer.step == 2
    assert np.isfinite(logs["loss_mask_dice"]) and 0 < logs["loss_mask_dice"] < 1
    assert any(not torch.equal(a, p) for a, p in zip(proto, trainer.model.heads["instance"].detect.proto.parameters()))


def test_external_output_loss_value_and_refusals(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    import my_vfmkd_ext.mask_dice_loss  # noqa: F401  (registers mask_dice_distill and its pairing)

    from vfmkd.distillation.pairing.output_rules import TeacherOutputs
    from vfmkd.engine.builders import build_loss_terms, build_model

    loss = LOSSES.build("mask_dice_distill", where="t", teacher="sam", smooth=1.0)
    student, teacher = torch.zeros(1, 1, 1, 2), torch.tensor([[[[100.0, -100.0]]]])  # p = (.5, .5), q = (1, 0)
    expected = 1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1)
    assert loss(student, teacher, torch.ones(1, 1, 1, 2)).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="smooth must be > 0"):
        LOSSES.build("mask_dice_distill", where="t", smooth=0.0)
    model = build_model({"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                         "heads": {"instance": {"type": "yolo_seg_head", "num_classes": 80},
                                   "semantic": {"type": "semantic_head", "num_classes": 134}}})
    offers = {"dino": TeacherOutputs("dino", "dinov2"), "sam": TeacherOutputs("sam", "sam", can_segment=True)}
    with pytest.raises(ConfigError, match="mask_dice_distill on the instance head 'instance' needs a teacher that can "
                                          "segment.*sam, lora_sam, sam2"):
        build_loss_terms({"d": {"type": "mask_dice_distill", "teacher": "dino"}}, model, {}, {}, teachers=offers)
    with pytest.raises(ConfigError, match="mask_dice_distill does not apply to a semantic head"):
        build_loss_terms({"d": {"type": "mask_dice_distill", "teacher": "sam", "head": "semantic"}}, model, {}, {},
                         teachers=offers)
