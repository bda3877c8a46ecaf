"""Memory presets (configs/presets, vfmkd/utils/presets.py): auto's choice, precedence, every preset on the
main and the two-teacher experiment, bad names. Config level only (no model is built)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

import vfmkd.teachers  # noqa: F401  (fills the teacher registry, as the tools do)
from vfmkd.core.config import teacher_kwargs
from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.utils import presets
from vfmkd.utils.cli import apply_preset, experiment_parser, load_experiment_args, parse_experiment_args, run_tool

MAIN = "configs/experiments/yolov8_sam_coco128.yaml"
TWO_TEACHERS = "configs/experiments/yolov8s_sam2_dinov2_coco128.yaml"
LIVE = ["teachers.sam.offline=false"]
SIZE_RULE = {"sam": 16, "sam2": 32, "dinov2": 14}  # input_size multiples (patch sizes)


def load(*argv: str):
    return load_experiment_args(parse_experiment_args(experiment_parser("train"), list(argv)))


def fake_gpu(monkeypatch, total_memory: float) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Fake GPU", total_memory=int(total_memory)))


@pytest.mark.parametrize("total, expected", [
    (80e9, "gpu_24g_plus"), (34.1e9, "gpu_24g_plus"),  # A100 80 GB, V100 32 GB
    (25.4e9, "gpu_16g"), (15.8e9, "gpu_16g"),          # RTX 4090 "24 GB", T4 "16 GB"
    (12.6e9, "gpu_8g"), (8.2e9, "gpu_8g"),             # 12 GB and 8 GB cards
])
def test_auto_follows_the_gpu_memory(monkeypatch, total, expected):
    fake_gpu(monkeypatch, total)
    name, why = presets.auto_preset()
    assert name == expected and f"{total / 1e9:.1f} GB" in why


def test_auto_without_cuda_is_the_cpu_preset(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert presets.auto_preset()[0] == "cpu"
    assert load(MAIN, "--preset", "auto")["train"]["preset"] == "cpu"


def test_no_preset_by_default_leaves_the_experiment_as_written():
    cfg = load(MAIN)
    assert cfg["train"]["preset"] is None
    assert (cfg["data"]["batch_size"], cfg["train"]["accumulate"], cfg["distillation"]["distill_interval"]) == (
        16,
        1,
        1,
    )
    assert cfg["teachers"]["sam"]["input_size"] == 1024 and "device" not in cfg["teachers"]["sam"]


def test_gpu_8g_moves_the_levers_and_keeps_the_effective_batch(caplog):
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        cfg = load(MAIN, "--preset", "gpu_8g", *LIVE)
    assert cfg["train"]["preset"] == "gpu_8g"
    assert (cfg["data"]["batch_size"], cfg["train"]["accumulate"]) == (4, 4)
    assert cfg["distillation"]["distill_interval"] == 4 and cfg["train"]["amp"] == "auto"
    assert cfg["teachers"]["sam"]["input_size"] == 512 and cfg["teachers"]["sam"]["device"] == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preset ")]
    assert (
        len(lines) == 1 and "teachers.sam.input_size 1024 -> 512" in lines[0] and "data.batch_size 16 -> 4" in lines[0]
    )


def test_overrides_and_shortcut_flags_beat_the_preset():
    cfg = load(MAIN, "--preset", "gpu_8g", *LIVE, "teachers.sam.input_size=768", "distillation.distill_interval=2",
               "data.batch_size=8", "--dataset", "coco128")
    assert cfg["teachers"]["sam"]["input_size"] == 768 and cfg["distillation"]["distill_interval"] == 2
    assert (cfg["data"]["batch_size"], cfg["train"]["accumulate"]) == (8, 1)  # the batch pair is the user's
    assert cfg["teachers"]["sam"]["device"] == "cpu"  # the levers the overrides leave alone still move
    # train.preset=... among the overrides beats --preset and the file's train.preset
    assert load(MAIN, "--preset", "gpu_8g", "train.preset=gpu_16g")["train"]["preset"] == "gpu_16g"


def test_a_cached_teacher_keeps_its_cache_size_and_device():
    cfg = load(MAIN, "--preset", "gpu_8g")  # teachers.sam is offline: the cache fixes size and precision
    assert cfg["teachers"]["sam"]["input_size"] == 1024 and "device" not in cfg["teachers"]["sam"]


def test_presets_are_idempotent_so_a_run_config_reloads_unchanged():
    once = load(MAIN, "--preset", "gpu_8g", *LIVE)
    assert apply_preset(presets.with_changes(once, []), [], "run/config.yaml") == once  # --resume reads config.yaml


@pytest.mark.parametrize("name", presets.preset_names())
@pytest.mark.parametrize("experiment, live", [
    (MAIN, LIVE), (TWO_TEACHERS, ["teachers.sam2.offline=false", "teachers.dinov2.offline=false"])])
def test_every_preset_validates_on_the_main_and_the_two_teacher_experiment(name, experiment, live):
    cfg = load(experiment, "--preset", name, *live)
    plain = load(experiment, *live)
    assert cfg["train"]["preset"] == name
    assert (
        cfg["data"]["batch_size"] * cfg["train"]["accumulate"]
        == plain["data"]["batch_size"] * plain["train"]["accumulate"]
    )
    for teacher, entry in cfg["teachers"].items():  # each teacher builds its settings at the preset's size
        settings = TEACHERS.get(entry["type"]).settings_from(**teacher_kwargs(entry))
        size, cap, rule = (
            plain["teachers"][teacher]["input_size"],
            presets.load_preset(name).max_input_size,
            SIZE_RULE[entry["type"]],
        )
        assert settings.input_size == (size if size <= cap else cap // rule * rule)


def test_dsrl_levers_only_where_dsrl_runs():
    dsrl = "configs/experiments/regnet_fusion_dsrl_sam_panoptic_coco128.yaml"
    assert load(dsrl, "--preset", "gpu_16g")["model"]["resolution_distill"]["use_low_res_sr"] is True
    assert load(MAIN, "--preset", "gpu_16g")["model"]["resolution_distill"]["use_low_res_sr"] is False


def test_unknown_preset_names_the_presets_and_exits_2(capsys):
    with pytest.raises(ConfigError, match=r"unknown preset 'gpu8g'\. Did you mean 'gpu_8g'\?.*gpu_24g_plus"):
        load(MAIN, "--preset", "gpu8g")

    def main(argv):
        load(MAIN, "train.preset=big")
        return 0
    assert run_tool(main, []) == 2


def test_a_preset_file_takes_only_levers(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    (tmp_path / "mine.yaml").write_text("set: {data.img_size: 320}\n")
    with pytest.raises(ConfigError, match="set.data.img_size is not a preset lever"):
        presets.load_preset("mine")
