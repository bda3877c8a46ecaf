"""torchrun on CPU (gloo): a 2-rank run on coco128 matches the 1-rank run with the doubled batch,
and only rank 0 writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.engine.training.trainer import Trainer
from vfmkd.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

pytestmark = pytest.mark.slow  # an end-to-end run of the tools: scheduled first (conftest)

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
SIZE, LIMIT = 64, 8


def overrides(features: Path, work_dir: Path, batch: int) -> list:
    return [f"teachers.sam.feature_path={features}", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
            f"data.limit={LIMIT}", "data.img_size=96", f"data.batch_size={batch}", "data.num_workers=0",
            "train.epochs=2", "train.optimizer=sgd", "train.lr=0.01", "train.warmup_iters=1", "train.device=cpu",
            "eval.fidelity=false",
            f"work_dir={work_dir}"]


def _flat(state) -> torch.Tensor:
    return torch.cat([v.flatten().float() for k, v in sorted(state.items()) if v.is_floating_point()])


def test_two_gloo_ranks_match_one_rank_with_the_doubled_batch(tmp_path):
    features = tmp_path / "sam"
    assert ptf.main(["--teacher", "sam", "--splits", "train2017", "--limit", str(LIMIT), "--output", str(features),
                     "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    single = Trainer(load_experiment(EXPERIMENT, overrides(features, tmp_path / "one", 4)), progress=False)
    start = _flat(single.model.state_dict())
    one = single.fit()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tools" / "train.py"), "--config", str(EXPERIMENT), "--no-progress",
           *overrides(features, tmp_path / "two", 2)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "two" / "yolov8_sam_coco128").iterdir())
    assert len(runs) == 1  # rank 0 alone made the run directory and wrote in it
    two = json.loads((runs[0] / "metrics.json").read_text())
    assert two["world_size"] == 2 and len(two["epochs"]) == 2
    for a, b in zip(one["epochs"], two["epochs"]):  # the loss curve, averaged over ranks
        assert b["train"]["loss_feat_distill_sam"] == pytest.approx(a["train"]["loss_feat_distill_sam"], rel=0.05)
        # The total includes the detection loss, whose BatchNorm statistics come from half batches per rank
        # (no SyncBatchNorm, as in ultralytics' DDP): with YOLOv8's own BatchNorm eps (1e-3) it differed by
        # 11 % at batch 2 per rank, so 20 % here; the feature loss above and the weights below stay tight.
        assert b["train"]["loss"] == pytest.approx(a["train"]["loss"], rel=0.2)
    # Final weights: the same update. SGD, because Adam's per-parameter normalisation turns the tiny
    # gradient differences of BatchNorm over half batches (per rank) into large update differences;
    # measured: update cosine 0.997, relative difference 0.07.
    w1 = _flat(load_checkpoint(single.run_dir / "checkpoints" / "last.pt")["model"]) - start
    w2 = _flat(load_checkpoint(runs[0] / "checkpoints" / "last.pt")["model"]) - start
    assert torch.nn.functional.cosine_similarity(w1, w2, dim=0) > 0.9
    assert (w1 - w2).norm() < 0.5 * w1.norm()


def test_segmentation_validation_on_rank_0_does_not_wait_for_the_other_ranks(tmp_path):
    """Validation runs on rank 0 alone: its torchmetrics scorers (mIoU, Dice, PQ) must not sync across the
    torchrun group (they did, and rank 0 blocked in an all_gather the other ranks never joined)."""
    experiment = tmp_path / "seg.yaml"
    experiment.write_text(json.dumps({  # JSON is YAML
        "experiment_name": "seg_ddp", "work_dir": str(tmp_path / "runs"),
        "model": {"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                  "heads": {"instance": {"type": "yolo_seg_head", "num_classes": 80, "num_protos": 32},
                            "semantic": {"type": "semantic_head", "num_classes": 130},
                            "binary": {"type": "binary_head"}}},
        "distillation": {"losses": {"instance_segmentation": {"head": "instance"},
                                    "semantic_segmentation": {"head": "semantic"},
                                    "binary_segmentation": {"head": "binary"}}},
        "data": {"dataset": "coco128", "root": str(REPO / "datasets" / "coco128"), "img_size": 64, "limit": 4,
                 "batch_size": 1, "num_workers": 0, "binary_classes": ["person"]},
        "train": {"epochs": 1, "warmup_iters": 1, "device": "cpu", "vis_interval": 0},
        "eval": {"fidelity": False, "batch_size": 4},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tools" / "train.py"), "--config", str(experiment), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "runs" / "seg_ddp").iterdir())
    val = json.loads((run / "metrics.json").read_text())["epochs"][-1]["val"]
    assert {"mIoU", "per_class_iou"} <= set(val["semantic"]) and "dice" in val["binary"] and "PQ" in val["panoptic"]
