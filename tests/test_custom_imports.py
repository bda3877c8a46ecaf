"""A backbone defined outside vfmkd, named from YAML through custom_imports, trains without any
change to vfmkd."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import ConfigError
from vfmkd.engine.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "custom_components"
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402


def test_external_backbone_trains_two_steps(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # the user's package is on PYTHONPATH, not in vfmkd
    features = tmp_path / "sam"
    assert ptf.main(["--teacher", "sam", "--limit", "4", "--output", str(features), "--no-progress",
                     "teacher.init=random", "teacher.input_size=128"]) == 0
    cfg = load_experiment(HERE / "tiny_convnet_sam.yaml", [f"teachers.sam.feature_path={features}",
                                                           f"work_dir={tmp_path}"])
    trainer = Trainer(cfg, progress=False)
    assert type(trainer.model.backbone).__name__ == "TinyConvNet"
    logs = trainer.train_one_epoch(1)  # 4 images, batch 2: two steps
    assert trainer.step == 2 and np.isfinite(logs["loss_feat_distill_sam"])


def test_missing_custom_module_says_how_to_fix():
    with pytest.raises(ConfigError, match="cannot import 'not_a_pkg.mod'.*PYTHONPATH"):
        load_experiment(HERE / "tiny_convnet_sam.yaml", ["custom_imports=[not_a_pkg.mod]"])
