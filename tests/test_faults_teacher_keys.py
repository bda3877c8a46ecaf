"""Issue 22, item 14: inside a training run a teacher's messages name that run's key path
(``teachers.<name>.<key>``), not the cache tool's ``teacher.<key>``; the cache tool keeps ``teacher.<key>``."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml

from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402
from vfmkd.engine.commands import train as train_tool  # noqa: E402

# the cache tool's spelling, as a whole key (not inside `teachers.sam_l.init`)
CACHE_TOOL_KEY = re.compile(r"(?<![\w.])teacher\.(init|checkpoint|input_size)")


def _two_teacher_experiment(tmp_path: Path, sam_l: dict) -> Path:
    """A cached SAM ViT-B-sized teacher plus a second SAM `sam_l`, both live here (no cache needed)."""
    cfg = {
        "experiment_name": "two_teachers",
        "work_dir": str(tmp_path / "runs"),
        "model": {"backbone": {"type": "yolov8", "config": "configs/backbones/yolov8n.yaml"},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 80}}},
        "teachers": {
            "sam_l": {"type": "sam", "offline": False, "variant": "vit_l", **sam_l},
            "sam": {"type": "sam", "offline": False, "init": "random", "input_size": 64},
        },
        "distillation": {"losses": {"sam_l_cosine": {"type": "feature_cosine", "teacher": "sam_l",
                                                     "student_level": "P5"},
                                    "feature_mse": {"teacher": "sam", "student_level": "P4"},
                                    "detection": {"weight": 1.0}}},
        "data": {"dataset": "coco128", "root": "datasets/coco128", "img_size": 64, "batch_size": 2, "limit": 2,
                 "num_workers": 0},
        "train": {"epochs": 1, "device": "cpu", "loggers": []},
    }
    path = tmp_path / "two_teachers.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # sam_l is built first
    return path


def _error(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "no error was logged"
    return errors[-1]


def test_a_missing_second_teacher_checkpoint_names_the_runs_keys(tmp_path, caplog):
    exp = _two_teacher_experiment(tmp_path, {"checkpoint": str(tmp_path / "missing_sam_vit_l.pth"), "input_size": 64})
    assert run_tool(train_tool.main, [str(exp), "--no-progress"]) == 2
    msg = _error(caplog)
    assert "checkpoint not found" in msg and "missing_sam_vit_l.pth" in msg, msg
    assert "teachers.sam_l.init=random" in msg and "teachers.sam_l.checkpoint=/path/to/sam_vit_l_0b3195.pth" in msg, msg
    assert not CACHE_TOOL_KEY.search(msg), msg


def test_a_settings_error_found_while_opening_a_cache_names_the_runs_key(tmp_path, caplog):
    # offline: the cache is checked against the teacher's config fingerprint, which validates the settings first
    exp = _two_teacher_experiment(tmp_path, {"offline": True, "feature_path": str(tmp_path / "cache"), "init": "random",
                                             "input_size": 100})
    assert run_tool(train_tool.main, [str(exp), "--no-progress"]) == 2
    msg = _error(caplog)
    assert "teachers.sam_l.input_size must be a positive multiple of 16" in msg and "nearest valid: 96 or 112" in msg, (
        msg
    )
    assert not CACHE_TOOL_KEY.search(msg), msg


def test_the_random_init_banner_of_a_training_run_names_the_runs_key(tmp_path, caplog):
    exp = _two_teacher_experiment(tmp_path, {"checkpoint": str(tmp_path / "missing_sam_vit_l.pth"), "input_size": 64})
    caplog.set_level(logging.WARNING, logger="vfmkd")
    # sam_l (a small random one) is built first, then the bad size of `sam` stops the run
    assert run_tool(train_tool.main, [str(exp), "--no-progress", "teachers.sam_l.init=random",
                                      "teachers.sam_l.variant=vit_b", "teachers.sam.input_size=100"]) == 2
    banner = next(r.getMessage() for r in caplog.records if "RANDOMLY INITIALISED" in r.getMessage())
    assert "teachers.sam_l.init=random" in banner and "set teachers.sam_l.init=pretrained" in banner, banner
    assert not CACHE_TOOL_KEY.search(banner), banner
    assert "teachers.sam.input_size must be a positive multiple of 16" in _error(caplog)


def test_the_cache_tool_keeps_its_own_keys(tmp_path, caplog):
    argv = ["--teacher", "sam", "--limit", "1", "--output", str(tmp_path / "c"), "--no-progress",
            f"teacher.checkpoint={tmp_path / 'missing_sam_vit_b.pth'}", "teacher.input_size=64"]
    assert run_tool(ptf.main, argv) == 2
    msg = _error(caplog)
    assert "set teacher.checkpoint=/path/to/sam_vit_b_01ec64.pth" in msg and "set teacher.init=random" in msg, msg
    assert "teachers." not in msg.replace("vfmkd/teachers", "")
