"""Experiment configs: component references, dotted overrides, unknown keys, types."""
from __future__ import annotations

import pytest
import yaml

from vfmkd.core.config import load_experiment, parse_overrides
from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import BACKBONES
from vfmkd.models.unified_model import UnifiedModel

EXPERIMENT = "configs/experiments/yolov8_sam_coco128.yaml"


def test_component_reference_is_resolved_and_overridable():
    cfg = load_experiment(EXPERIMENT)
    assert cfg["model"]["backbone"]["scale"] == "n"  # from configs/backbones/yolov8n.yaml
    cfg = load_experiment(EXPERIMENT, ["model.backbone.scale=s", "train.epochs=3", "data.batch_size=8"])
    assert cfg["model"]["backbone"]["scale"] == "s"
    assert cfg["train"]["epochs"] == 3 and cfg["data"]["batch_size"] == 8
    assert UnifiedModel.from_config(cfg["model"]).backbone.get_feature_dims()["P3"] == 128


def test_overrides_of_teachers_data_and_work_dir():
    cfg = load_experiment(EXPERIMENT, ["teachers.sam.input_size=512", "data.limit=16", "work_dir=/tmp/runs"])
    assert cfg["teachers"]["sam"]["input_size"] == 512
    assert cfg["teachers"]["sam"]["type"] == "sam"
    assert cfg["data"]["limit"] == 16 and cfg["work_dir"] == "/tmp/runs"
    assert cfg["distillation"]["losses"]["feature_mse"]["type"] == "feature_mse"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochz=3", "Did you mean 'epochs'"),
        ("trian.epochs=3", "Did you mean 'train'"),
        ("data.batch_sise=8", "Did you mean 'batch_size'"),
        ("train.epochs=three", "train.epochs"),
        ("data.img_size=100", "multiple of 32"),
        ("train.optimizer=adam", "adamw or sgd"),
    ],
)
def test_bad_overrides_name_the_fix(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_experiment(EXPERIMENT, [override])


def test_unknown_component_key_suggests_the_constructor_argument():
    cfg = load_experiment(EXPERIMENT, ["model.backbone.scal=s"])
    with pytest.raises(ConfigError, match="unknown key 'scal'.*Did you mean 'scale'"):
        UnifiedModel.from_config(cfg["model"])
    with pytest.raises(ConfigError, match="must be str"):
        BACKBONES.build("yolov8", scale=3)
    with pytest.raises(ConfigError, match="Did you mean 'yolov8'"):
        BACKBONES.get("yolov9")


def test_unknown_key_in_yaml_file_and_malformed_override(tmp_path):
    raw = yaml.safe_load(open(EXPERIMENT))
    raw["data"]["img_sz"] = 320
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="img_sz.*Did you mean 'img_size'"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("experiment_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(evil)
