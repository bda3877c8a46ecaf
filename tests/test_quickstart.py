"""The design document's quickstart as a new user types it: its experiment, its train command with
the shortcut flags, the positional forms, and the `model_path` alias. Offline, on coco128, with the
explicit random-init teacher; one short epoch on a few images at small sizes."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import ConfigError
from vfmkd.utils.cli import apply_shortcuts, experiment_parser, parse_experiment_args

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402
from vfmkd.engine.commands import test as test_tool  # noqa: E402
from vfmkd.engine.commands import train as train_tool  # noqa: E402

DESIGN = REPO / "configs" / "experiments" / "yolov8_sam2_coco.yaml"
MAIN = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
LIMIT, TEACHER_SIZE = 16, 64
# The design's teacher on an offline machine: model_path as written, random weights said out loud.
SAM2_RANDOM = ["teacher.model_path=weights/sam2.1_hiera_base_plus.pt", "teacher.init=random",
               f"teacher.input_size={TEACHER_SIZE}"]


def test_design_experiment_is_shipped_as_written():
    cfg = yaml.safe_load(DESIGN.read_text())
    assert cfg == {
        "experiment_name": "yolov8_sam2_coco_detection",
        "model": {"backbone": {"type": "yolov8", "config": "configs/backbones/yolov8.yaml"},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 80}}},
        "teachers": {"sam2": {"enabled": True, "offline": True, "model_path": "weights/sam2.1_hiera_base_plus.pt",
                              "feature_path": "teacher_features/sam2/"}},
        "distillation": {"offline_ratio": 0.8, "losses": {"feature_mse": {"weight": 1.0, "teacher": "sam2"},
                                                          "detection": {"weight": 5.0}}},
        "data": {"dataset": "coco128", "batch_size": 16, "num_workers": 8},
        "train": {"epochs": 100, "lr": 0.01, "optimizer": "adamw"},
    }


def test_design_quickstart_trains_one_mixed_epoch(tmp_path, caplog):
    """Cache SAM2 features for the first images, then the design's train command: batches come
    from the cache (offline_ratio 0.8) and from the live teacher, num_workers 8 is clamped."""
    features = tmp_path / "sam2"
    assert ptf.main(["--teacher", "sam2", "--limit", str(LIMIT), "--batch-size", "8", "--output", str(features),
                     "--no-progress", *SAM2_RANDOM]) == 0
    assert (features / "train2017.h5").is_file()
    caplog.set_level(logging.WARNING, logger="vfmkd")
    argv = ["--config", str(DESIGN), "--backbone", "yolov8", "--teacher", "sam2", "--dataset", "coco128",
            "teachers.sam2.init=random", f"teachers.sam2.input_size={TEACHER_SIZE}",
            f"teachers.sam2.feature_path={features}",
            f"data.limit={LIMIT}", "data.img_size=64", "data.batch_size=2", "train.epochs=1", "train.warmup_iters=2",
            "eval.batch_size=8", f"work_dir={tmp_path / 'runs'}", "--no-progress"]
    assert train_tool.main(argv) == 0
    (run,) = (tmp_path / "runs" / "yolov8_sam2_coco_detection").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    (epoch,) = metrics["epochs"]
    counts = epoch["teacher_batches"]["sam2"]
    assert counts["offline"] > 0 and counts["online"] > 0, counts  # mixed: some cached, some live
    assert counts["offline"] + counts["online"] == LIMIT // 2
    assert counts.get("online: offline_ratio draw", 0) == counts["online"]
    assert epoch["train"]["loss_feat_distill_sam2"] > 0 and "val" in epoch
    assert any("num_workers=8" in r.getMessage() and "core" in r.getMessage() for r in caplog.records)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    sam2 = saved["teachers"]["sam2"]
    assert sam2["checkpoint"] == "weights/sam2.1_hiera_base_plus.pt" and "model_path" not in sam2
    assert saved["model"]["backbone"]["variant"] == "n"  # configs/backbones/yolov8.yaml: the default scale
    # step 5, the positional form: tools/test.py CONFIG CHECKPOINT [overrides]
    assert test_tool.main([str(run / "config.yaml"), str(run / "checkpoints" / "best.pt"), "data.limit=4",
                           "--no-progress"]) == 0
    assert json.loads((run / "test_metrics_val2017.json").read_text())["images"] == 4


# ----------------------------------------------------------------------------- model_path alias
def test_model_path_is_the_checkpoint_alias(tmp_path):
    cfg = load_experiment(DESIGN)
    assert cfg["teachers"]["sam2"]["checkpoint"] == "weights/sam2.1_hiera_base_plus.pt"
    assert "model_path" not in cfg["teachers"]["sam2"]
    # the same on the command line and in a component file
    cfg = load_experiment(MAIN, ["teachers.sam.checkpoint=null", "teachers.sam.model_path=/w/a.pth"])
    assert cfg["teachers"]["sam"]["checkpoint"] == "/w/a.pth"
    teacher_file = tmp_path / "sam2_b.yaml"
    teacher_file.write_text("type: sam2\nmodel_path: /w/b.pt\ninput_size: 512\n")
    experiment = yaml.safe_load(DESIGN.read_text())
    experiment["teachers"]["sam2"] = {"config": str(teacher_file), "feature_path": "teacher_features/sam2/"}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment))
    cfg = load_experiment(tmp_path / "exp.yaml")
    assert cfg["teachers"]["sam2"]["checkpoint"] == "/w/b.pt" and cfg["teachers"]["sam2"]["input_size"] == 512
    assert "model_path" not in cfg["teachers"]["sam2"]
    # entry keys still win over the file's defaults, whichever spelling each uses
    cfg = load_experiment(DESIGN, [f"+teachers.sam2.config={teacher_file}", "teachers.sam2.model_path=/w/c.pt"])
    assert cfg["teachers"]["sam2"]["checkpoint"] == "/w/c.pt"


def test_model_path_and_checkpoint_disagreeing_is_an_error():
    with pytest.raises(ConfigError, match=r"teachers.sam2 sets both checkpoint='/w/x.pt' and its alias "
                                          r"model_path='weights/sam2.1_hiera_base_plus.pt'.*keep one"):
        load_experiment(DESIGN, ["+teachers.sam2.checkpoint=/w/x.pt"])
    same = load_experiment(DESIGN, ["+teachers.sam2.checkpoint=weights/sam2.1_hiera_base_plus.pt"])
    assert same["teachers"]["sam2"]["checkpoint"] == "weights/sam2.1_hiera_base_plus.pt"


def test_cache_tool_takes_model_path():
    args = ptf.build_parser().parse_args(["--teacher", "sam2", "teacher.model_path=/w/t.pt", "teacher.init=random"])
    entry, kwargs = ptf.resolve_teacher(args)
    assert kwargs["checkpoint"] == "/w/t.pt" and "model_path" not in entry


# ----------------------------------------------------------------------------- shortcut flags
def _load(argv, checkpoint=False):
    from vfmkd.utils.cli import load_experiment_args
    return load_experiment_args(parse_experiment_args(experiment_parser("t", checkpoint=checkpoint), argv))


def test_backbone_flag_picks_the_file_and_overrides_win():
    cfg = _load([str(MAIN), "--backbone", "yolov8s"])
    assert (
        cfg["model"]["backbone"]["config"] == "configs/backbones/yolov8s.yaml"
        and cfg["model"]["backbone"]["variant"] == "s"
    )
    cfg = _load([str(MAIN), "--backbone", "repvit_m0_9"])  # another family: the flag replaces the whole entry
    assert cfg["model"]["backbone"]["type"] == "repvit"
    cfg = _load([str(MAIN), "--backbone", "yolov8s", "model.backbone.variant=m"])
    assert cfg["model"]["backbone"]["variant"] == "m"
    with pytest.raises(ConfigError, match=r"--backbone yolov8ss: there is no configs/backbones/yolov8ss.yaml\. "
                                          r"Did you mean 'yolov8s'\?.*yolov8n, yolov8s"):
        _load([str(MAIN), "--backbone", "yolov8ss"])


def test_teacher_flag_selects_enabled_teachers():
    mixed = REPO / "configs" / "experiments" / "yolov8s_sam2_dinov2_coco128.yaml"
    raw = yaml.safe_load(mixed.read_text())
    with pytest.raises(ConfigError, match=r"leaves teacher 'dinov2' out, but distillation.losses.dinov2_p5 distils "
                                          r"from it; add it \(--teacher sam2,dinov2\) or remove that loss"):
        apply_shortcuts(raw, "mixed.yaml", teachers=["sam2"])
    raw["distillation"]["losses"] = {k: v for k,
                                     v in raw["distillation"]["losses"].items() if not k.startswith("dinov2")}
    out = apply_shortcuts(raw, "mixed.yaml", teachers=["sam2"])
    assert out["teachers"]["dinov2"]["enabled"] is False and out["teachers"]["sam2"].get("enabled", True)
    assert "enabled" not in raw["teachers"]["dinov2"]  # the caller's mapping is left alone
    cfg = _load([str(mixed), "--teacher", "sam2", "--teacher", "dinov2"])
    assert all(t.get("enabled", True) for t in cfg["teachers"].values())
    with pytest.raises(ConfigError, match=r"--teacher sam: .* has no teacher 'sam'\. Did you mean 'sam2'\?.*"
                                          r"Add a teachers.sam entry"):
        _load([str(DESIGN), "--teacher", "sam"])
    raw = yaml.safe_load(DESIGN.read_text())
    raw["teachers"]["sam2"]["enabled"] = False
    with pytest.raises(ConfigError, match=r"disables teachers.sam2 \(enabled: false\); set enabled: true"):
        apply_shortcuts(raw, "d.yaml", teachers=["sam2"])


def test_dataset_flag_sets_dataset_and_root_and_refuses_a_contradiction():
    raw = yaml.safe_load(DESIGN.read_text())
    out = apply_shortcuts(raw, "d.yaml", dataset="coco128")
    assert out["data"]["dataset"] == "coco128" and out["data"]["root"] == "datasets/coco128"
    with pytest.raises(ConfigError, match=r"--dataset coco2017 contradicts d.yaml, which sets data.dataset: coco128"):
        apply_shortcuts(raw, "d.yaml", dataset="coco2017")
    del raw["data"]["dataset"]
    with pytest.raises(ConfigError, match=r"datasets/coco2017/ does not exist.*bash scripts/download_datasets.sh "
                                          r"coco2017"):
        apply_shortcuts(raw, "d.yaml", dataset="coco2017")
    raw["data"]["root"] = "/data/coco"  # an explicit root is kept
    assert apply_shortcuts(raw, "d.yaml", dataset="coco2017")["data"]["root"] == "/data/coco"


# ----------------------------------------------------------------------------- positional forms
def test_positional_and_flag_forms_agree():
    parser = lambda: experiment_parser("t", checkpoint=True)  # noqa: E731
    a = parse_experiment_args(parser(), [str(MAIN), "run/checkpoints/best.pt", "data.limit=4", "--teacher", "sam"])
    b = parse_experiment_args(parser(), ["--config", str(MAIN), "--checkpoint", "run/checkpoints/best.pt",
                                         "--teacher", "sam", "data.limit=4"])
    assert (a.config, a.checkpoint, a.overrides, a.teacher) == (b.config, b.checkpoint, b.overrides, b.teacher) \
        == (str(MAIN), "run/checkpoints/best.pt", ["data.limit=4"], ["sam"])
    train = parse_experiment_args(experiment_parser("t"), [str(MAIN), "train.epochs=3"])
    assert train.config == str(MAIN) and train.overrides == ["train.epochs=3"]


@pytest.mark.parametrize("argv, message", [
    (["configs/x.yaml", "epochs3"], r"unexpected argument 'epochs3': expected CONFIG.yaml \(positional or --config\)"),
    (["run/best.pt"], r"unexpected argument 'run/best.pt'"),
    (["train.epochs=3"], r"no experiment config: give it first"),
])
def test_train_positional_mistakes(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_experiment_args(experiment_parser("train.py"), argv)


def test_test_tool_needs_a_checkpoint():
    parser = experiment_parser("t", checkpoint=True)
    parser.prog = "test.py"
    with pytest.raises(ConfigError, match=r"no checkpoint: `test.py CONFIG work_dirs/<run>/checkpoints/best.pt`"):
        parse_experiment_args(parser, [str(MAIN)])
    with pytest.raises(ConfigError, match=r"unexpected argument 'best'.*CONFIG.yaml CHECKPOINT.pt"):
        parse_experiment_args(parser, [str(MAIN), "best"])


def test_train_tool_exits_2_on_a_user_mistake(capsys):
    from vfmkd.utils.cli import run_tool
    assert run_tool(train_tool.main, [str(DESIGN), "--dataset", "coco2017"]) == 2
