"""tools/finetune_teacher.py (LoRA fine-tuning of SAM on coco128 person masks), the lora_sam teacher reading its
file, and seed 004's run-wide distillation.temperature / alpha / beta overrides."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from coco_fixture_sets import REPO, coco_image
from PIL import Image
from small_sam import small_window_sam

from vfmkd.core.config import experiment_from_dict, read_yaml
from vfmkd.engine.builders.losses import with_run_temperature
from vfmkd.engine.commands import finetune_teacher
from vfmkd.engine.finetune.config import load_finetune_config
from vfmkd.engine.finetune.loop import LAST, TEACHER_FILE, Finetuner
from vfmkd.teachers.lora_sam_teacher import LoraSamTeacher
from vfmkd.utils.cli import run_tool

CONFIG = REPO / "configs" / "finetune" / "sam_lora_person_coco128.yaml"
EXPERIMENT = REPO / "configs" / "experiments" / "lora_sam_binary_person_coco128.yaml"
SIZE = 64


def _cfg(tmp_path, epochs):
    # the first 5 train2017 images: one with a person (000000000036); the first val2017 image: two people
    return load_finetune_config(CONFIG, ["teacher.init=random", f"teacher.input_size={SIZE}", f"work_dir={tmp_path}",
                                         f"train.epochs={epochs}", "data.limit=5", "data.val_limit=1",
                                         "train.lr=0.01"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch, then --resume to a second: (run dir, the base decoder's state, the resumed Finetuner)."""
    tmp = tmp_path_factory.mktemp("finetune")
    with small_window_sam():
        first = Finetuner(_cfg(tmp, 1), tmp / "run", progress=False)
        base_decoder = {k: v.clone() for k, v in first.sam.mask_decoder.state_dict().items()}
        first.fit()
        del first
        resumed = Finetuner(_cfg(tmp, 2), tmp / "run", resume=True, progress=False)
        assert resumed.epoch == 1
        resumed.fit()
    return tmp / "run", base_decoder, resumed


def test_finetune_validates_before_and_after_every_epoch_and_resumes(run):
    run_dir, _, resumed = run
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2]  # 0: the base model, before fine-tuning
    assert history[0]["train_loss"] is None and all(r["train_loss"] > 0 for r in history[1:])
    assert all(r["val_instances"] == history[0]["val_instances"] >= 1 and 0 <= r["val_dice"] <= 1 for r in history)
    assert (run_dir / LAST).is_file() and (run_dir / TEACHER_FILE).is_file()
    assert resumed.optimizer.state  # Adam's moments came back from last.pt


def test_the_lora_sam_teacher_loads_the_file_and_prompts_the_finetuned_decoder(run):
    run_dir, base_decoder, resumed = run
    with small_window_sam():
        teacher = LoraSamTeacher(init="random", input_size=SIZE, lora_checkpoint=str(run_dir / TEACHER_FILE))
    assert teacher.fingerprint().variant == "vit_b+lora_r4_a4"  # rank and alpha read from the file
    image = np.array(Image.open(coco_image(0)).convert("RGB"))
    feats, batch = teacher.extract_features([image])
    with torch.no_grad():  # merged LoRA == the fine-tuner's unmerged adapters
        torch.testing.assert_close(feats["image_embeddings"], resumed._embed(batch.pixels), atol=1e-4, rtol=1e-4)
    boxes, idx = torch.tensor([[4.0, 4.0, 48.0, 40.0]]), torch.zeros(1, dtype=torch.long)
    tuned = teacher.mask_logits(feats, boxes, idx)
    teacher.sam.mask_decoder.load_state_dict(base_decoder)
    assert (tuned - teacher.mask_logits(feats, boxes, idx)).abs().max() > 1e-3


def test_an_existing_run_is_not_overwritten_silently(run):
    run_dir, _, _ = run
    args = [str(CONFIG), f"work_dir={run_dir.parent}", "experiment_name=run", "--no-progress"]
    assert run_tool(finetune_teacher.main, args) == 2
    assert run_tool(finetune_teacher.main, [str(CONFIG), "train.prompts=[box,scribble]"]) == 2


def test_seed_004_overrides_and_a_run_wide_temperature(caplog):
    cfg = experiment_from_dict(read_yaml(EXPERIMENT), ["distillation.temperature=6.0", "distillation.alpha=0.3",
                                                       "distillation.beta=0.7"], str(EXPERIMENT))
    dist = cfg["distillation"]
    assert (dist["temperature"], dist["alpha"], dist["beta"], dist["gamma"]) == (6.0, 0.3, 0.7, 0.1)
    losses = {**dist["losses"], "mask_distill": {"type": "mask_distill", "teacher": "lora_sam", "temperature": 2.0}}
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        out = with_run_temperature(losses, dist["temperature"])
    assert out["kl_divergence"]["temperature"] == 6.0  # the run-wide default
    assert out["mask_distill"]["temperature"] == 2.0  # an entry's own wins
    assert "temperature" not in out["feature_mse"] and "temperature" not in out["binary_segmentation"]
    assert caplog.text.count("distillation.temperature=6") == 1 and "mask_distill (T=2)" in caplog.text
    assert with_run_temperature(losses, None) is losses
