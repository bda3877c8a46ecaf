"""Multi-node, tested on one machine: two torchrun agents (``--nnodes 2 --nproc-per-node 1``, c10d
rendezvous on 127.0.0.1, gloo) cache a teacher's features and train a student on them together; the
result equals the single-node 2-process run (``--standalone --nproc_per_node 2``): the same cache and
the same trained weights. One launch per layout runs both tools (the cache tool keeps the process group
for the training that follows), on 2 images, a 64 px teacher and a 64 px student, one step."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vfmkd.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
pytestmark = pytest.mark.slow  # two torchrun launches (four processes)

DRIVER = textwrap.dedent("""
    import sys
    import torch.distributed as tdist
    sys.path[:0] = [{repo!r}]
    from vfmkd.engine.commands import prepare_features, train
    destroy, tdist.destroy_process_group = tdist.destroy_process_group, lambda *a, **k: None  # kept for training
    assert prepare_features.main({cache!r}) == 0
    tdist.destroy_process_group = destroy
    sys.exit(train.main({train!r}))
""")


def driver(tmp: Path, name: str) -> Path:
    features, work = tmp / name / "sam", tmp / name / "runs"
    cache = ["--teacher", "sam", "--splits", "train2017", "--limit", "2", "--batch-size", "1", "--no-progress",
             "--output", str(features), "teacher.init=random", "teacher.input_size=64"]
    train = ["--config", str(EXPERIMENT), "--no-progress", f"teachers.sam.feature_path={features}",
             "teachers.sam.init=random", "teachers.sam.input_size=64", "data.limit=2", "data.img_size=64",
             "data.batch_size=1", "data.num_workers=0", "train.epochs=1", "train.optimizer=sgd", "train.lr=0.01",
             "train.warmup_iters=1", "train.device=cpu", "eval.fidelity=false", f"work_dir={work}"]
    script = tmp / f"{name}.py"
    script.write_text(DRIVER.format(repo=str(REPO), cache=cache, train=train))
    return script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1"}
RUN = [sys.executable, "-m", "torch.distributed.run"]


def last_weights(tmp: Path, name: str) -> dict:
    runs = list((tmp / name / "runs" / "yolov8_sam_coco128").iterdir())
    assert len(runs) == 1  # rank 0 alone made the run directory
    return load_checkpoint(runs[0] / "checkpoints" / "last.pt")["model"]


def test_two_agents_cache_and_train_like_one_node_with_two_processes(tmp_path):
    port = free_port()
    agents = [subprocess.Popen(RUN + ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                      "--rdzv-endpoint", f"127.0.0.1:{port}", "--node-rank", str(node),
                                      str(driver(tmp_path, "multi"))],
                               cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for node in (0, 1)]
    single = subprocess.run(RUN + ["--standalone", "--nproc_per_node", "2", str(driver(tmp_path, "single"))],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    for agent in agents:
        out, err = agent.communicate(timeout=240)
        assert agent.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    # the cache: both an index over 2 shards (one per rank), equal dataset by dataset
    with h5py.File(tmp_path / "multi" / "sam" / "train2017.h5", "r") as a, \
            h5py.File(tmp_path / "single" / "sam" / "train2017.h5", "r") as b:
        names = []
        b.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert "features/image_embeddings" in names and a["done"][:].all()
        for n in names:
            assert np.array_equal(a[n][:], b[n][:], equal_nan=a[n].dtype.kind == "f"), n
    # the trained weights: the same gloo all-reduce of the same two ranks' gradients
    multi, one = last_weights(tmp_path, "multi"), last_weights(tmp_path, "single")
    assert multi.keys() == one.keys()
    for k, v in one.items():
        assert torch.equal(multi[k], v), k
