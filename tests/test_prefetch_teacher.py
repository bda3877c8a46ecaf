"""The prefetching live teacher (vfmkd/distillation/prefetch.py) changes when live passes run, never what
they compute: a mixed, augmented run with prefetch gets the same targets and losses as a serial run, and a
prefetching run stopped mid-epoch and resumed ends with the uninterrupted run's weights."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import ConfigError
from vfmkd.distillation.prefetch import TargetPrefetcher, split_threads
from vfmkd.engine.training.trainer import Trainer
from vfmkd.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

pytestmark = pytest.mark.bitexact  # compares runs bit for bit at a fixed thread split
EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
SIZE, LIMIT = 64, 4


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "sam"
    assert ptf.main(["--teacher", "sam", "--splits", "train2017", "--limit", str(LIMIT), "--output", str(out),
                     "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    return out


def config(features: Path, work: Path, prefetch: str, epochs: int = 1) -> dict:
    return load_experiment(EXPERIMENT, [
        f"teachers.sam.feature_path={features}", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
        f"data.limit={LIMIT}", "data.img_size=64", "data.batch_size=2", "data.num_workers=0",
        "distillation.offline_ratio=0.7",
        f"train.epochs={epochs}", "train.lr=0.003", "train.warmup_iters=2", "eval.fidelity=false",
        "train.vis_interval=0", f"train.teacher_prefetch={prefetch}", "train.teacher_threads=1",
        f"work_dir={work}"])


def recorded(trainer: Trainer) -> list:
    """Wraps the trainer's step module: records (step, teacher -> primary live/cached map) of every step."""
    seen, step_module = [], trainer.step_module

    def step(batch, targets, *args):
        seen.append((trainer.step, {n: t.features["image_embeddings"].clone() for n, t in targets.items()}))
        return step_module(batch, targets, *args)

    trainer.step_module = step
    return seen


def test_prefetching_run_equals_the_serial_run_and_resumes_exactly(features, tmp_path):
    # the same thread count for every computation in both runs: serial on 1 thread, prefetch 1 + 1 of 2 cores
    torch.set_num_threads(1)
    serial = Trainer(config(features, tmp_path / "serial", "off", epochs=1), progress=False)
    serial_seen = recorded(serial)
    serial.fit()
    torch.set_num_threads(2)
    snapshot = tmp_path / "snapshot"
    prefetch = Trainer(config(features, tmp_path / "prefetch", "on", epochs=1), progress=False)
    assert prefetch.prefetcher.overlaps
    seen = recorded(prefetch)
    original = prefetch.save

    def save(name, *args, **kwargs):  # keep the run as it stood after its first step
        path = original(name, *args, **kwargs)
        if kwargs.get("resume_at") == (1, 1) and not snapshot.exists():
            shutil.copytree(prefetch.run_dir, snapshot)
        return path

    prefetch.save = save
    prefetch.train_cfg.save_interval_steps = 1
    prefetch.fit()
    assert [s for s, _ in seen] == [s for s, _ in serial_seen] == list(range(2))
    for (_, got), (_, want) in zip(seen, serial_seen):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name])
    counts = prefetch.router.summary()["sam"]
    assert counts == serial.router.summary()["sam"] and counts["online"] == 1 and counts["offline"] == 1, counts
    assert [r["train"] for r in prefetch.history] == [r["train"] for r in serial.history]
    assert torch.get_num_threads() == 2  # the student's budget is restored after each epoch

    resumed = Trainer(config(features, tmp_path / "prefetch", "on", epochs=1), progress=False, resume=snapshot)
    assert resumed.start_batch == 1
    resumed.fit()
    want = load_checkpoint(prefetch.run_dir / "checkpoints" / "last.pt")
    got = load_checkpoint(snapshot / "checkpoints" / "last.pt")
    for key, value in want["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert resumed.router.summary() == prefetch.router.summary()


def test_the_teacher_thread_has_its_own_budget_and_bad_settings_are_refused():
    assert split_threads(2, 0) == (1, 1) and split_threads(8, 0) == (4, 4) and split_threads(4, 3) == (3, 1)
    seen = {}

    class Live:  # the smallest live model: reports the thread budget its pass ran with
        def targets(self, batch):
            seen["threads"], seen["thread"] = torch.get_num_threads(), threading.current_thread().name
            return "targets"

    class Router:
        sources = {"t": type("Source", (), {"live": Live()})()}

        def plan(self, step, batch, cached, teachers):
            return [("t", type("R", (), {"mode": "online"})())]

        def count(self, name, route):
            seen.setdefault("counted", []).append(name)

        def live_model(self, name, route):
            return self.sources[name].live

    class Item:
        batch, cached = torch.zeros(1), {}

    torch.set_num_threads(2)
    assert not TargetPrefetcher(Router(), torch.device("cpu")).overlaps  # auto: a side stream on CUDA, not a CPU thread
    prefetcher = TargetPrefetcher(Router(), torch.device("cpu"), mode="on", teacher_threads=1)
    out = list(prefetcher.epoch([Item()] * 3, 0, 1, ["t"]))
    assert [p.step for p in out] == [0, 1, 2] and out[0].targets == {"t": "targets"}
    assert seen["threads"] == 1 and seen["thread"].startswith("vfmkd-teacher") and len(seen["counted"]) == 3
    assert torch.get_num_threads() == 2
    with pytest.raises(ConfigError, match="train.teacher_prefetch"):
        TargetPrefetcher(Router(), torch.device("cpu"), mode="always")
