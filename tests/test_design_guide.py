"""The design's extension guide works as written: a backbone that implements ``forward``,
``get_feature_dims`` and ``get_feature_strides`` and a teacher that implements feature extraction and
mask prediction, both defined outside vfmkd and named through ``custom_imports``, train together."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.engine.training.trainer import Trainer
from vfmkd.models.backbones.base import BaseBackbone

HERE = Path(__file__).resolve().parent / "custom_components"


def test_backbone_and_teacher_written_to_the_guide_train_two_steps(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # the user's package is on PYTHONPATH, not in vfmkd
    cfg = load_experiment(HERE / "design_guide_binary.yaml", [f"work_dir={tmp_path}"])
    trainer = Trainer(cfg, progress=False)
    backbone = trainer.model.backbone
    assert type(backbone).__name__ == "DesignConvNet"
    assert backbone.feature_specs() == (FeatureSpec("C3", 8, 8), FeatureSpec("C4", 16, 16), FeatureSpec("C5", 32, 32))
    logs = trainer.train_one_epoch(1)  # 4 images, batch 2: two steps
    assert trainer.step == 2
    # the teacher's features and its box-prompted masks both reached a loss
    for key in ("loss_feat_distill_design_teacher", "loss_kl_distill", "loss_binary"):
        assert np.isfinite(logs[key]) and logs[key] > 0, key


def test_the_guide_teacher_fingerprints_and_segments(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    from my_vfmkd_ext.design_teacher import DesignTeacher

    teacher = DesignTeacher(init="random", input_size=64, seed=3)
    assert teacher.fingerprint() == DesignTeacher.config_fingerprint(init="random", input_size=64, seed=3)
    assert teacher.fingerprint().weights == "random-init:seed3"
    img = np.zeros((40, 80, 3), np.uint8)
    feats, batch = teacher.extract_features([img, img[:, :20]])
    assert feats["features"].shape == (2, 16, 4, 4) and batch.valid_hw.tolist() == [[32, 64], [64, 32]]
    masks = teacher.mask_logits(feats, torch.tensor([[0.0, 0, 32, 16], [8, 8, 24, 40]]), torch.tensor([0, 1]))
    assert masks.shape == (2, 16, 16) and masks[0, :4, :8].min() > 0 and masks[0, 8:, :].max() < 0


def _levels(self, x):
    return OrderedDict(P3=x)


def test_a_backbone_declaring_feature_specs_gets_the_getters():
    class SpecsOnly(BaseBackbone):
        forward = _levels

        def feature_specs(self):
            return (FeatureSpec("P3", 3, 1),)

    assert SpecsOnly().get_feature_dims() == {"P3": 3} and SpecsOnly().get_feature_strides() == {"P3": 1}


def test_a_backbone_declaring_neither_fails_naming_both_contracts():
    with pytest.raises(TypeError, match=r"implement feature_specs\(\).*or both get_feature_dims\(\) and "
                                        r"get_feature_strides\(\) \(it lacks get_feature_dims and get_feature_strides"):
        class Undeclared(BaseBackbone):
            forward = _levels

    with pytest.raises(TypeError, match=r"it lacks get_feature_strides"):
        class HalfDeclared(BaseBackbone):
            forward = _levels

            def get_feature_dims(self):
                return {"P3": 3}


def test_getters_naming_different_levels_are_refused():
    class Mismatched(BaseBackbone):
        forward = _levels

        def get_feature_dims(self):
            return {"P3": 3}

        def get_feature_strides(self):
            return {"P4": 16}

    with pytest.raises(ValueError, match="must name the same levels"):
        Mismatched().feature_specs()
