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
