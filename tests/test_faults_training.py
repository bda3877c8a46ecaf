"""Training-side faults on coco128: NaN weights are never evaluated, a pickle payload is never
resumed, an unusable run directory stops the tool with the reason (exit 2)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.engine.training.trainer import Trainer
from vfmkd.utils.checkpoint import load_checkpoint
from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import test as test_tool  # noqa: E402
from vfmkd.engine.commands import train as train_tool  # noqa: E402

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
PLAIN = ["data.limit=4", "data.img_size=64", "data.batch_size=4", "data.num_workers=0", "train.epochs=1",
         "eval.fidelity=false", "teachers.sam.enabled=false", "distillation.losses.feature_mse.weight=0"]


class Payload:  # what a malicious or foreign pickle would carry
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("runs")
    overrides = [o for o in PLAIN if not o.startswith("distillation")] + [f"work_dir={work}"]
    cfg = load_experiment(EXPERIMENT, overrides)
    cfg["distillation"]["losses"] = {"detection": cfg["distillation"]["losses"]["detection"]}
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    return trainer.run_dir


def test_test_tool_refuses_nan_weights(run, tmp_path):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    bad = run / "checkpoints" / "nan.pt"
    torch.save(state, bad)  # written around save_checkpoint on purpose: it would refuse
    assert run_tool(test_tool.main,
                    ["--config", str(run / "config.yaml"), "--checkpoint", str(bad), "--no-progress"]) == 2


def test_resume_refuses_a_pickle_payload(run, tmp_path):
    bad_run = tmp_path / "bad_run"
    (bad_run / "checkpoints").mkdir(parents=True)
    (bad_run / "config.yaml").write_text((run / "config.yaml").read_text())
    torch.save({"model": {}, "payload": Payload()}, bad_run / "checkpoints" / "last.pt")
    assert run_tool(train_tool.main, ["--resume", str(bad_run), "--no-progress"]) == 2


def test_unusable_run_directory_exits_2(tmp_path, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the work_dir should be")
    argv = ["--config", str(EXPERIMENT), "--no-progress", *PLAIN[:-2], f"work_dir={blocker}",
            "teachers.sam.offline=false", "teachers.sam.init=random", "teachers.sam.input_size=64"]
    assert run_tool(train_tool.main, argv) == 2
    assert "not_a_dir" in caplog.text
