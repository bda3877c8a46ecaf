"""One contract test over every registered backbone (timm's test_models.py pattern)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vfmkd.models  # noqa: F401  (registers the built-in components)
from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import BACKBONES
from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.backbones.yolov8 import YOLOV8_VARIANTS

# Each registered backbone with the keyword sets to check; a new backbone must add itself here.
VARIANTS = {
    "yolov8": [{"variant": v} for v in YOLOV8_VARIANTS],
    "vit": [{"variant": "tiny", "img_size": 224}, {"variant": "small", "out_channels": 64, "strides": [4, 8, 16, 32]}],
    "repvit": [{"variant": "repvit_m0_9"}, {"variant": "repvit_m1_1", "strides": [4, 8, 16, 32]}],
    "regnet": [{"variant": "regnetx_002"}, {"variant": "regnety_002", "strides": [4, 8, 16, 32]}],
    "mamba": [{"variant": "tiny"}, {"variant": "tiny", "scan": "bi", "strides": [4, 8, 16]}, {"variant": "small"}],
    # ultralytics' own YAML (the size is the letter in its name, ultralytics' convention)
    "ultralytics": [{"model": "yolo11n.yaml", "num_classes": 3}],
}


def test_every_registered_backbone_is_covered():
    # vfmkd's own backbones; a user's backbone registered by another test (custom_imports) doesn't count.
    builtin = {n for n in BACKBONES.names() if BACKBONES.get(n).__module__.startswith("vfmkd.")}
    assert builtin == set(VARIANTS), f"add variants for {builtin - set(VARIANTS)}"


@pytest.mark.parametrize(
    "name, kwargs", [(n, kw) for n in sorted(VARIANTS) for kw in VARIANTS[n]], ids=lambda v: str(v)
)
def test_declared_dims_and_strides_match_outputs(name, kwargs):
    model = BACKBONES.build(name, **kwargs).eval()
    assert isinstance(model, BaseBackbone)
    h, w = 96, 128  # non-square on purpose
    with torch.no_grad():
        out = model(torch.rand(2, 3, h, w))
    dims, strides = model.get_feature_dims(), model.get_feature_strides()
    assert list(out) == [s.name for s in model.feature_specs()] == list(dims) == list(strides)
    for level, feat in out.items():
        assert feat.shape == (2, dims[level], h // strides[level], w // strides[level]), level


def test_yolov8_matches_ultralytics_parameter_count():
    # ultralytics reports 3,157,200 parameters for yolov8n.yaml with 80 classes.
    from vfmkd.models.unified_model import UnifiedModel

    model = UnifiedModel.from_config(
        {"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
         "heads": {"detection": {"type": "yolo_head", "num_classes": 80}}}
    )
    assert sum(p.numel() for p in model.parameters()) == 3_157_200


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_backbone_sizes_itself_with_variant(name):
    """One key for a model size: every backbone takes ``variant`` and keeps the value it was given; an ultralytics
    model is sized by its file's name (yolo11n.yaml), which its ``variant`` reports."""
    kwargs = VARIANTS[name][0]
    if "model" in kwargs:
        assert BACKBONES.build(name, **kwargs).variant == Path(kwargs["model"]).stem
        return
    assert "variant" in kwargs
    assert BACKBONES.build(name, **kwargs).variant == kwargs["variant"]


@pytest.mark.parametrize(
    "name, bad, expected",
    [
        ("yolov8", "nano", r"unknown yolov8 variant 'nano'.*Choose from n, s, m, l, x"),
        ("repvit", "repvit_m09", r"unknown repvit variant 'repvit_m09'.*Did you mean 'repvit_m0_9'\?.*repvit_m2_3"),
        ("regnet", "regnetx_02", r"unknown regnet variant 'regnetx_02'.*Did you mean 'regnetx_002'\?.*regnety_016"),
        ("vit", "tiniy", r"unknown vit variant 'tiniy'.*Did you mean 'tiny'\?"),
        ("mamba", "smal", r"unknown mamba variant 'smal'.*Did you mean 'small'\?"),
    ],
)
def test_unknown_variant_names_the_choices(name, bad, expected):
    with pytest.raises(ConfigError, match=expected):
        BACKBONES.build(name, variant=bad)


@pytest.mark.parametrize("name, old, value", [("yolov8", "scale", "n"), ("repvit", "model_name", "repvit_m0_9"),
                                              ("regnet", "model_name", "regnetx_002")])
def test_old_size_keys_say_they_were_renamed(name, old, value):
    with pytest.raises(ConfigError, match=rf"key '{old}' was renamed to 'variant'.*write variant: {value}\."):
        BACKBONES.build(name, **{old: value})


def test_yolov8_sppf_is_activated_like_ultralytics_yolov8():
    # ultralytics' SPPF module has no activation on cv1; its parser adds SiLU for YOLOv8 YAML rows.
    from ultralytics.nn.tasks import DetectionModel

    ours = BACKBONES.build("yolov8", variant="n").stage5[-1]
    theirs = DetectionModel("yolov8n.yaml", verbose=False).model[9]
    assert type(ours.cv1.act) is type(theirs.cv1.act) is torch.nn.SiLU
