"""A run's life on coco128: resuming a finished run touches nothing and training time adds up over
resumes; tools/test.py never needs the teacher for task metrics; no usable checkpoint says so; SIGTERM
stops training and caching cleanly (the continue command, exit 143, no lock) and the run resumes;
a config error found after the run directory was made leaves no orphan directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vfmkd.engine.training.trainer as trainer_module
from vfmkd.core.config import load_experiment
from vfmkd.core.errors import CheckpointError
from vfmkd.engine.builders import LiveTeachers
from vfmkd.engine.training.trainer import Trainer
from vfmkd.utils.checkpoint import load_checkpoint
from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402
from vfmkd.engine.commands import test as test_tool  # noqa: E402
from vfmkd.engine.commands import train as train_tool  # noqa: E402

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
SIZE, LIMIT = 64, 4


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "sam"
    assert ptf.main(["--teacher", "sam", "--splits", "train2017", "val2017", "--limit", str(LIMIT), "--output",
                     str(out),
                     "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    return out


def overrides(features: Path, work_dir: Path, *extra: str) -> list:
    return [f"teachers.sam.feature_path={features}", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
            f"data.limit={LIMIT}", "data.img_size=64", "data.batch_size=2", "data.num_workers=0", "train.epochs=1",
            "eval.fidelity=false", f"work_dir={work_dir}", *extra]


@pytest.fixture(scope="module")
def run(features, tmp_path_factory) -> Path:
    trainer = Trainer(load_experiment(EXPERIMENT, overrides(features, tmp_path_factory.mktemp("runs"))), progress=False)
    trainer.fit()
    return trainer.run_dir


# ----------------------------------------------------------------------------- item 5: finished runs, time
def test_training_time_adds_up_over_resumes_and_a_finished_run_is_left_alone(run, tmp_path, monkeypatch, caplog):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = load_checkpoint(copy / "checkpoints" / "last.pt")["resume"].get("train_seconds", 0.0)
    assert json.loads((copy / "metrics.json").read_text())["train_seconds"] >= before > 0
    frozen = time.time()
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(time=lambda: frozen))  # the resumed session takes 0 s
    assert train_tool.main(["--resume", str(copy), "--no-progress", "train.epochs=2"]) == 0
    monkeypatch.undo()
    metrics = json.loads((copy / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    # the first session's time (to its last.pt) is kept
    assert metrics["train_seconds"] == pytest.approx(before, abs=0.06)

    files = [copy / "metrics.json", copy / "config.yaml", *(copy / "checkpoints").iterdir()]
    saved = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    caplog.clear()
    assert train_tool.main(["--resume", str(copy), "--no-progress"]) == 0
    assert "already finished its 2 epoch(s)" in caplog.text and "train.epochs=" in caplog.text
    assert "done in" not in caplog.text
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == saved


# ----------------------------------------------------------------------------- item 12: no usable checkpoint
def test_no_usable_checkpoint_says_the_run_cannot_continue(run, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    last = broken / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    (broken / "checkpoints" / "last.prev.pt").write_bytes(data[: len(data) // 3])
    assert run_tool(train_tool.main, ["--resume", str(broken), "--no-progress"]) == 2
    text = caplog.text
    assert "no usable checkpoint" in text and "last.pt" in text and "last.prev.pt" in text
    assert f"python tools/train.py --config {broken / 'config.yaml'}" in text
    assert "re-download" not in text


# ----------------------------------------------------------------------------- item 9: test.py and the teacher
def test_task_metrics_never_need_the_teacher(run, features, tmp_path, monkeypatch, caplog):
    def no_weights(self, name, cached_input_size):
        def load():
            raise CheckpointError("checkpoint not found: weights/sam_vit_b_01ec64.pth")
        return load

    monkeypatch.setattr(LiveTeachers, "loader", no_weights)  # a machine without the teacher's weights
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    (train_only / "train2017.h5").symlink_to(features / "train2017.h5")
    argv = ["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "last.pt"), "--no-progress",
            "eval.fidelity=true"]
    assert run_tool(test_tool.main, [*argv, f"teachers.sam.feature_path={train_only}"]) == 0
    result = json.loads((run / "test_metrics_val2017.json").read_text())
    assert "mAP50-95" in result and "fidelity" not in result
    assert "held-out fidelity skipped" in caplog.text and "--fidelity live" in caplog.text
    assert "prepare_teacher_features.py --teacher sam" in caplog.text and "--splits val2017" in caplog.text
    caplog.clear()  # a live-only teacher has nothing to cache: --fidelity live is the one way, said once
    assert run_tool(test_tool.main, [*argv, "teachers.sam.offline=false"]) == 0
    assert "(teachers.sam: live only, offline: false); pass --fidelity live" in caplog.text
    assert "cache it" not in caplog.text and "nothing to cache" not in caplog.text

    # the val cache gives fidelity without the live teacher; --fidelity live without weights says why it fails
    assert run_tool(test_tool.main, argv) == 0
    result = json.loads((run / "test_metrics_val2017.json").read_text())
    assert result["fidelity"]["sam/image_embeddings@P4"]["cells"] > 0
    assert set(result["fidelity_sources"]["sam"]) == {"offline"}  # cached only, no live pass
    caplog.clear()
    assert run_tool(test_tool.main, [*argv, "--fidelity", "live", f"teachers.sam.feature_path={train_only}"]) == 2
    assert "checkpoint not found" in caplog.text


# ----------------------------------------------------------------------------- item 15: no orphan run directory
def test_a_config_error_after_the_run_directory_leaves_none(features, tmp_path, caplog):
    argv = [
        "--config",
        str(EXPERIMENT),
        "--no-progress",
        *overrides(features, tmp_path, "model.resolution_distill.enabled=true"),
    ]
    assert run_tool(train_tool.main, argv) == 2
    assert "DSRL" in caplog.text
    assert not (tmp_path / "yolov8_sam_coco128").exists() or not any((tmp_path / "yolov8_sam_coco128").iterdir())


def test_tools_test_leaves_no_empty_results_folder_when_it_fails(run, tmp_path):
    loose = tmp_path / "student.pt"  # a checkpoint outside its run directory: results would go to a new folder
    shutil.copy(run / "checkpoints" / "last.pt", loose)
    argv = ["--config", str(run / "config.yaml"), "--checkpoint", str(loose), "--no-progress",
            f"work_dir={tmp_path / 'work'}", "model.heads.detection.num_classes=3"]  # does not fit the checkpoint
    assert run_tool(test_tool.main, argv) == 2
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


# ----------------------------------------------------------------------------- item 13: signals
TRAIN_DRIVER = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(2)
    sys.path.insert(0, sys.argv[1])
    from vfmkd.engine.commands import train
    from vfmkd.engine.training.trainer import Trainer
    from vfmkd.utils.cli import entry
    original = Trainer.train_step
    def train_step(self, *args, **kwargs):
        logs = original(self, *args, **kwargs)
        print(f"STEP {self.step}", flush=True)  # the test signals after this line
        time.sleep(0.3)
        return logs
    Trainer.train_step = train_step
    sys.argv = ["tools/train.py", *sys.argv[2:]]
    entry(train.main)
""")


def _signal_after(argv: list, marker: str, sig: int, log: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` in its own session (its DataLoader workers too), send ``sig`` to the whole group once
    ``marker`` is printed (as a terminal's Ctrl-C or Slurm would), and wait for it."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        out = []
        for line in proc.stdout:
            out.append(line)
            if line.strip() == marker:
                os.killpg(proc.pid, sig)
                break
        rest, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(out) + rest, log.read_text())


@pytest.mark.bitexact
def test_sigterm_mid_training_saves_says_how_to_resume_and_resumes_exactly(features, tmp_path):
    extra = ("data.batch_size=1", "data.num_workers=2")  # 4 steps in the epoch; workers get the signal too
    straight = Trainer(load_experiment(EXPERIMENT, overrides(features, tmp_path / "straight", *extra)), progress=False)
    straight.fit()
    want = load_checkpoint(straight.run_dir / "checkpoints" / "last.pt")

    driver = tmp_path / "driver.py"
    driver.write_text(TRAIN_DRIVER)
    work = tmp_path / "stopped"
    proc = _signal_after([sys.executable, str(driver), str(REPO), "--config", str(EXPERIMENT),
                          "--no-progress",
                          *overrides(features, work, *extra)], "STEP 2", signal.SIGTERM, tmp_path / "train.err")
    assert proc.returncode == 143, proc.stderr[-3000:]
    run = next((work / "yolov8_sam_coco128").iterdir())
    line = [x for x in proc.stderr.splitlines() if "stopped by SIGTERM" in x]
    assert len(line) == 1 and f"--resume {run}" in line[0], proc.stderr[-3000:]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["resume"]["epoch"] == 1 and state["resume"]["batch"] in (2, 3)  # mid-epoch, where it stopped
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp file left

    assert train_tool.main(["--resume", str(run), "--no-progress"]) == 0
    got = load_checkpoint(run / "checkpoints" / "last.pt")
    for key, value in want["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert [e["epoch"] for e in json.loads((run / "metrics.json").read_text())["epochs"]] == [1]


def test_a_signal_before_the_first_checkpoint_says_nothing_was_saved(features, tmp_path, monkeypatch, caplog):
    build = trainer_module.build_distiller

    def interrupted(*args, **kwargs):  # Ctrl-C while the run is being built
        os.kill(os.getpid(), signal.SIGINT)
        return build(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_distiller", interrupted)
    work = tmp_path / "runs"
    handler = signal.getsignal(signal.SIGINT)
    assert run_tool(train_tool.main, ["--config", str(EXPERIMENT), "--no-progress", *overrides(features, work)]) == 130
    assert "stopped by SIGINT" in caplog.text and "nothing was saved" in caplog.text
    assert not (work / "yolov8_sam_coco128").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # the tool gave the handler back


CACHE_DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from vfmkd.engine.commands import prepare_features as ptf
    from vfmkd.cache.writer import FeatureCacheWriter
    from vfmkd.utils.cli import entry
    original = FeatureCacheWriter.write
    def write(self, start, *args):
        original(self, start, *args)
        print(f"WROTE {start}", flush=True)  # the test signals after this line
        time.sleep(0.5)
    FeatureCacheWriter.write = write
    sys.argv = ["tools/prepare_teacher_features.py", *sys.argv[2:]]
    entry(ptf.main)
""")


def test_sigterm_mid_caching_releases_the_lock_and_the_rerun_finishes(tmp_path, capsys):
    driver = tmp_path / "driver.py"
    driver.write_text(CACHE_DRIVER)
    out = tmp_path / "sam"
    args = ["--teacher", "sam", "--splits", "train2017", "--limit", "6", "--batch-size", "2", "--output", str(out),
            "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]
    proc = _signal_after([sys.executable, str(driver), str(REPO), *args], "WROTE 0", signal.SIGTERM,
                         tmp_path / "cache.err")
    assert proc.returncode == 143, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if "stopped by SIGTERM" in x]
    assert len(line) == 1 and "rerun" in line[0] and "tools/prepare_teacher_features.py --teacher sam" in line[0]
    assert not list(out.glob("*.lock")) and not list(out.glob(".*"))  # no lock, no temp file
    capsys.readouterr()
    assert ptf.main(args) == 0
    printed = capsys.readouterr().out
    assert "already cached" in printed and " 0 already cached" not in printed


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(features, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(TRAIN_DRIVER.replace('print(f"STEP {self.step}", flush=True)',
                                           'print(f"STEP {self.step}", flush=True) if self.ctx.is_main else None'))
    work = tmp_path / "runs"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
            str(REPO), "--config", str(EXPERIMENT), "--no-progress",
            *overrides(features, work, "data.batch_size=1", "train.device=cpu", "train.epochs=2")]
    proc = _signal_after(argv, "STEP 1", signal.SIGTERM, tmp_path / "torchrun.err")
    assert proc.returncode != 0 and str(REPO / "vfmkd") not in proc.stderr, proc.stderr[-3000:]  # no rank's traceback
    assert proc.stderr.count("stopped by SIGTERM") == 2, proc.stderr[-3000:]  # each rank, one line
    run = next((work / "yolov8_sam_coco128").iterdir())
    assert f"continue it with: torchrun --nproc_per_node 2 tools/train.py --resume {run}" in proc.stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")["resume"]
    # 2 steps an epoch on each rank: stopped after the first (or, on a loaded machine, at the epoch's end)
    assert state["world_size"] == 2 and (state["epoch"], state["batch"]) in ((1, 1), (2, 0))
