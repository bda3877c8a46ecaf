"""A task defined outside vfmkd, in one file named from YAML through custom_imports, trains through the
Trainer on coco128 without any change to vfmkd (docs/adding_a_task.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vfmkd.core.config import load_experiment
from vfmkd.engine.training.trainer import Trainer

HERE = Path(__file__).resolve().parent / "custom_components"


def test_external_task_trains_two_steps(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # the user's package is on PYTHONPATH, not in vfmkd
    cfg = load_experiment(HERE / "tiny_saliency_task.yaml", [f"work_dir={tmp_path}"])
    trainer = Trainer(cfg, progress=False)
    from vfmkd.tasks import task_of

    task = task_of(trainer.model.heads["saliency"])
    assert task.name == "saliency" and type(task).__module__ == "my_vfmkd_ext.saliency_task"
    assert trainer.train_set.semantic_table is not None  # the dataset loaded the label kind the task asks for
    before = trainer.model.heads["saliency"].logit.weight.detach().clone()
    logs = trainer.train_one_epoch(1)  # 4 images, batch 2: two steps
    assert trainer.step == 2 and np.isfinite(logs["loss_saliency"])
    assert not torch_equal(before, trainer.model.heads["saliency"].logit.weight)


def torch_equal(a, b) -> bool:
    return bool((a == b.detach()).all())
