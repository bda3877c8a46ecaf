"""Experiment configs: component references, dotted overrides, unknown keys, types."""
from __future__ import annotations

import pytest
import yaml

from vfmkd.core.config import load_experiment, parse_overrides
from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import BACKBONES, RENAMED_KEYS, Registry
from vfmkd.models.unified_model import UnifiedModel

EXPERIMENT = "configs/experiments/yolov8_sam_coco128.yaml"


def test_component_reference_is_resolved_and_overridable():
    cfg = load_experiment(EXPERIMENT)
    assert cfg["model"]["backbone"]["variant"] == "n"  # from configs/backbones/yolov8n.yaml
    cfg = load_experiment(EXPERIMENT, ["model.backbone.variant=s", "train.epochs=3", "data.batch_size=8"])
    assert cfg["model"]["backbone"]["variant"] == "s"
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


STAGED = "configs/experiments/regnet_fusion_dsrl_sam_panoptic_coco128.yaml"


def test_a_stage_is_overridden_by_its_index():
    cfg = load_experiment(STAGED, ["train.stages.0.epochs=1", "train.stages.2.lr=0.001", "train.stages.2.epochs=2"])
    stages = cfg["train"]["stages"]
    assert [s["epochs"] for s in stages] == [1, 20, 2] and cfg["train"]["epochs"] == 23
    assert stages[2]["lr"] == 0.001 and stages[0]["name"] == "base"  # the rest of the entry is kept
    with pytest.raises(ConfigError, match="train.stages has 3 entries \\(indices 0..2\\)"):
        load_experiment(STAGED, ["train.stages.3.epochs=1"])
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        load_experiment(STAGED, ["train.stages.1.epoch=1"])


def test_unknown_component_key_suggests_the_constructor_argument():
    cfg = load_experiment(EXPERIMENT, ["model.backbone.varient=s"])
    with pytest.raises(ConfigError, match="unknown key 'varient'.*Did you mean 'variant'"):
        UnifiedModel.from_config(cfg["model"])
    with pytest.raises(ConfigError, match="must be str"):
        BACKBONES.build("yolov8", variant=3)
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


# --- renamed keys: one name (`variant`) for a model size across students and teachers -------------

RENAMED = "was renamed to 'variant' \\(one name for a model size across students and teachers\\)"


def test_old_student_size_key_names_variant():
    with pytest.raises(ConfigError, match=f"backbone 'yolov8': key 'scale' {RENAMED}: write variant: n\\.$"):
        BACKBONES.build("yolov8", scale="n")


def test_old_size_key_in_an_override_fails_through_the_builder():
    cfg = load_experiment(EXPERIMENT, ["model.backbone.scale=s"])
    with pytest.raises(ConfigError, match=f"^model.backbone: key 'scale' {RENAMED}: write variant: s\\.$"):
        UnifiedModel.from_config(cfg["model"])


@pytest.mark.parametrize("backbone, old, value", [
    ({"type": "yolov8"}, "scale", "m"),
    ({"type": "repvit", "config": "configs/backbones/repvit_m0_9.yaml"}, "model_name", "repvit_m1_1"),
    ({"type": "regnet"}, "model_name", "regnety_002"),
])
def test_old_size_key_in_an_experiment_yaml_fails_through_the_builder(tmp_path, backbone, old, value):
    raw = yaml.safe_load(open(EXPERIMENT))
    raw["model"]["backbone"] = dict(backbone, **{old: value})
    path = tmp_path / "old_keys.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_experiment(path)
    with pytest.raises(ConfigError, match=f"^model.backbone: key '{old}' {RENAMED}: write variant: {value}\\.$"):
        UnifiedModel.from_config(cfg["model"])


class _SizedComponent:
    """Stands in for any component (a teacher, neck, head, loss) that takes ``variant``."""

    def __init__(self, variant: str = "vit_b", input_size: int = 1024) -> None:
        self.variant, self.input_size = variant, input_size


@pytest.mark.parametrize("kind", ["backbone", "neck", "head", "teacher", "loss"])
@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_renamed_key_hint_for_every_registry_kind(kind, old):
    registry = Registry(kind)
    registry.register("sam")(_SizedComponent)
    where = f"{kind}s.sam"
    with pytest.raises(ConfigError) as err:
        registry.build("sam", where=where, **{old: "vit_b"}, input_size=512)
    assert str(err.value) == (f"{where}: key '{old}' was renamed to 'variant' (one name for a model size across "
                              "students and teachers): write variant: vit_b.")
    assert registry.build("sam", where=where, variant="vit_l").variant == "vit_l"


def test_renamed_key_hint_only_where_the_old_key_is_gone_and_the_new_one_exists():
    registry = Registry("loss")

    @registry.register("takes_scale")
    def takes_scale(scale: float = 1.0, variant: str = "a"):  # `scale` is a real parameter here
        return scale

    @registry.register("no_variant")
    def no_variant(scales: int = 1):  # nothing was renamed for this one: the ordinary did-you-mean
        return scales

    @registry.register("var_kw")
    def var_kw(variant: str = "a", **extra):  # **kwargs would swallow the old key silently
        return variant

    assert registry.build("takes_scale", scale=0.5) == 0.5
    with pytest.raises(ConfigError, match="unknown key 'scale' for loss 'no_variant'. Did you mean 'scales'"):
        registry.build("no_variant", where="distillation.losses.x", scale=2)
    with pytest.raises(ConfigError, match="^loss 'var_kw': key 'model_name' was renamed.*write variant: 3\\.$"):
        registry.build("var_kw", model_name=3)
    assert registry.build("var_kw", variant="b", other=1) == "b"


def test_a_constructor_refusing_its_arguments_is_a_config_error_naming_the_key():
    """A component's ValueError (four RegNet levels into the three-level YOLOv8 neck) was a traceback
    through tools/train.py; it is a ConfigError (exit 2) under the component's key."""
    cfg = {"backbone": {"type": "regnet", "variant": "regnetx_002", "strides": [4, 8, 16, 32]},
           "neck": {"type": "yolov8_pafpn"}, "heads": {"detection": {"type": "yolo_head", "num_classes": 3}}}
    with pytest.raises(ConfigError, match=r"^model\.neck: yolov8_pafpn fuses exactly three.*model\.backbone\.strides"):
        UnifiedModel.from_config(cfg)
    with pytest.raises(ConfigError, match=r"^model\.heads\.detection: num_classes must be >= 1"):
        UnifiedModel.from_config({**cfg, "backbone": {"type": "regnet", "variant": "regnetx_002"},
                                  "heads": {"detection": {"type": "yolo_head", "num_classes": 0}}})
