"""Exact resume and nothing lost on coco128: a run killed mid-epoch (a real SIGKILL) and resumed ends
with weights identical to an uninterrupted run's; a kill during a checkpoint save keeps the previous
checkpoint; non-finite steps and checkpoints are refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.engine.training.trainer import Trainer
from vfmkd.utils.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402
from vfmkd.engine.commands import train as train_tool  # noqa: E402

# Compares numbers with subprocesses / cached passes bit for bit: runs on two threads under xdist (conftest).
pytestmark = pytest.mark.bitexact

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
SIZE, LIMIT = 64, 8


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "sam"
    assert ptf.main(["--teacher", "sam", "--splits", "train2017", "--limit", str(LIMIT), "--output", str(out),
                     "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    return out


def overrides(features: Path, work_dir: Path, workers: int) -> list:
    # Augmentation and a mixed live/cached teacher: every source of randomness is exercised.
    return [f"teachers.sam.feature_path={features}", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
            f"data.limit={LIMIT}", "data.img_size=96", "data.batch_size=2", f"data.num_workers={workers}",
            "data.augment.fliplr=0.5", "data.augment.scale=0.2", "distillation.offline_ratio=0.5",
            "train.epochs=2", "train.lr=0.003", "train.warmup_iters=2", "train.save_interval_steps=1",
            "eval.fidelity=false", f"work_dir={work_dir}"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(2)
    sys.path.insert(0, sys.argv[1])
    from vfmkd.engine.commands import train
    from vfmkd.engine.training.trainer import Trainer
    original, saves = Trainer.save, []
    def save(self, name, *args, **kwargs):
        path = original(self, name, *args, **kwargs)
        saves.append(name)
        if len(saves) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # right after this checkpoint, mid-epoch
        return path
    Trainer.save = save
    sys.exit(train.main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def straight(features, tmp_path_factory):
    """The uninterrupted run, once: loading with 0 or 2 workers draws the same batches (per-sample seeds),
    so both kills below must end at its weights."""
    trainer = Trainer(load_experiment(EXPERIMENT, overrides(features, tmp_path_factory.mktemp("straight"), 0)),
                      progress=False)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(features, straight, tmp_path, workers):
    want = load_checkpoint(straight.run_dir / "checkpoints" / "last.pt")
    # an epoch-end last.pt carries that epoch's record: a run killed right after it resumes with it
    assert [r["epoch"] for r in want["resume"]["history"]] == [1, 2]

    driver = tmp_path / "killer.py"
    driver.write_text(KILLER)
    work = tmp_path / "killed"
    argv = ["--config", str(EXPERIMENT), "--no-progress", *overrides(features, work, workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(driver), str(REPO), "3", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = next((work / "yolov8_sam_coco128").iterdir())
    assert load_checkpoint(run / "checkpoints" / "last.pt")["resume"]["batch"] == 3  # killed in epoch 1
    if workers == 0:
        # A damaged last.pt (e.g. a truncating copy): the resume falls back to the checkpoint it
        # replaced, one step earlier, and, being exact, still ends with the same weights.
        last = run / "checkpoints" / "last.pt"
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    assert train_tool.main(["--resume", str(run), "--no-progress"]) == 0
    got = load_checkpoint(run / "checkpoints" / "last.pt")
    for key, value in want["model"].items():
        assert torch.equal(value, got["model"][key]), key
    for key, value in want["distiller"].items():
        assert torch.equal(value, got["distiller"][key]), key
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["epochs"][-1]["teacher_batches"] == straight.router.summary()
    assert metrics["epochs"][0]["train"] == pytest.approx(straight.history[0]["train"])
    log = (run / "train.log").read_text()
    assert ("resumed at epoch 1, batch 2" if workers == 0 else "resumed at epoch 1, batch 3") in log


def test_resume_with_another_setup_is_refused_naming_the_differences(features, tmp_path):
    cfg = load_experiment(EXPERIMENT, overrides(features, tmp_path, 0) + ["train.epochs=1"])
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    changed = load_experiment(EXPERIMENT, overrides(features, tmp_path, 0) + ["train.epochs=1", "train.seed=7"])
    with pytest.raises(ConfigError, match="train.seed: 0 -> 7"):
        Trainer(changed, progress=False, resume=trainer.run_dir)
    # More epochs is a continuation: allowed (with a warning).
    more = load_experiment(EXPERIMENT, overrides(features, tmp_path, 0) + ["train.epochs=2"])
    resumed = Trainer(more, progress=False, resume=trainer.run_dir)
    assert resumed.start_epoch == 2 and resumed.run_dir == trainer.run_dir


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.ones(3)})
    code = textwrap.dedent(f"""
        import os, signal, torch
        from vfmkd.utils.checkpoint import save_checkpoint
        real = torch.save
        def dying(obj, f, *a, **k):
            f.write(b"partial bytes")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying
        save_checkpoint({str(path)!r}, {{"w": torch.zeros(3)}})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))  # the previous checkpoint, intact
    save_checkpoint(path, {"w": torch.full((3,), 2.0)})
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the killed save's temp file is gone


def test_non_finite_values_never_reach_a_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    with pytest.raises(CheckpointError, match="model.w holds NaN/inf"):
        save_checkpoint(path, {"model": {"w": torch.tensor([1.0, float("nan")])}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_a_huge_weight_blames_the_weighted_total_and_k_bad_steps_in_a_row_stop(features, tmp_path):
    from vfmkd.core.errors import NonFiniteLossError

    base = overrides(features, tmp_path, 0)[:-4] + ["train.epochs=1", "eval.fidelity=false", f"work_dir={tmp_path}",
                                                    "distillation.offline_ratio=1.0"]
    base = [o for o in base if not o.startswith("data.augment")]
    cfg = load_experiment(EXPERIMENT,
                          base + ["distillation.losses.detection.weight=1e38", "train.max_nonfinite_steps=2"])
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(NonFiniteLossError, match="weighted total loss is inf although every term is finite"):
        trainer.fit()
    log = (trainer.run_dir / "train.log").read_text()
    assert "refused (1 in a row)" in log  # the first bad step was refused, the second stopped the run
    state = load_checkpoint(trainer.run_dir / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
