"""A task defined outside vfmkd, in one file named from YAML through custom_imports, trains, is scored
and drawn through the Trainer on coco128 without any change to vfmkd (docs/adding_a_task.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vfmkd.core.config import load_experiment
from vfmkd.engine.training.trainer import Trainer
from vfmkd.tasks import task_of

HERE = Path(__file__).resolve().parent / "custom_components"


def test_external_task_trains_scores_and_draws(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # the user's package is on PYTHONPATH, not in vfmkd
    cfg = load_experiment(HERE / "tiny_saliency_task.yaml", [f"work_dir={tmp_path}", "train.vis_interval=1",
                                                            "eval.vis_images=2"])
    trainer = Trainer(cfg, progress=False)
    head = trainer.model.heads["saliency"]
    task = task_of(head)
    assert task.name == "saliency" and type(task).__module__ == "my_vfmkd_ext.saliency_task"
    assert trainer.train_set.semantic_table is not None  # the dataset loaded the label kind the task asks for
    before = head.logit.weight.detach().clone()
    logs = trainer.train_one_epoch(1)  # 4 images, batch 2: two steps
    assert trainer.step == 2 and np.isfinite(logs["loss_saliency"])
    assert not torch.equal(before, head.logit.weight.detach())
    result = trainer.evaluate(1)  # its scorer, and its row of the epoch pictures
    assert 0.0 <= result["saliency"]["iou"] <= 1.0
    assert list((trainer.run_dir / "visualizations").glob("epoch_001*.png"))
