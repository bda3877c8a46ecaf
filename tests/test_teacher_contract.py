"""The contract every registered teacher keeps (timm's tests/test_models.py pattern): one small
random-init config per teacher, the same checks for all. A teacher registered without a case here
fails :func:`test_every_registered_teacher_has_a_case`."""
from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_layouts import write_official  # tests/official_layouts.py
from PIL import Image

import vfmkd.distillation.vfmkd_model_teacher  # noqa: F401  (registers the vfmkd teacher when this file runs alone)
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.teachers import BaseTeacher, SamTeacher, TeacherSettings
from vfmkd.teachers.base import resized_hw
from vfmkd.utils.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
IMAGE = sorted((REPO / "datasets/coco128/images/val2017").glob("*.jpg"))[0]
#: the vfmkd teacher's case: a tiny YOLOv8-n run checkpoint, written by the module fixture _vfmkd_run
VFMKD_RUN = Path(tempfile.mkdtemp(prefix="vfmkd_contract_")) / "best.pt"

#: registered name -> constructor kwargs of a small, fast, random-init build
TEACHER_CASES = {
    "sam": dict(variant="vit_b", init="random", input_size=64),
    "lora_sam": dict(variant="vit_b", init="random", input_size=64, lora_rank=4),
    "sam2": dict(variant="sam2.1_hiera_tiny", init="random", input_size=64),
    "sam3": dict(variant="tiny", init="random", input_size=56),  # the full size: 466 M parameters
    "dino": dict(variant="vits16", init="random", input_size=64),
    "dinov2": dict(variant="vits14", init="random", input_size=56),
    "dinov3": dict(variant="vits16", init="random", input_size=64),
    "dinov3_convnext": dict(variant="tiny", init="random", input_size=64),
    "radio": dict(variant="c-radio_v3-b", init="random", input_size=64),
    "pe_core": dict(variant="tiny16", init="random", input_size=64),
    "vfmkd": dict(variant="yolov8-n", checkpoint=str(VFMKD_RUN)),
}
#: teachers whose input is the student's letterbox canvas itself: the padding is part of the input
#: (valid_hw = the whole canvas) and a live pass takes the whole canvas, not the content crop
CANVAS_INPUT = {"vfmkd"}
#: the timm-built teachers of 2025-26 whose official checkpoint layouts are round-tripped (end of this file)
OFFICIAL = ("dinov3", "dinov3_convnext", "radio", "pe_core")
NAMES = sorted(TEACHER_CASES)
# odd (height, width) pairs: portrait, landscape, halves that round up (5 * 64/128 = 2.5), tiny
ODD_SIZES = [(45, 128), (128, 45), (37, 53), (101, 99), (5, 128), (1, 3)]


@pytest.fixture(scope="module", autouse=True)
def _vfmkd_run():
    """A vfmkd run's checkpoint (Trainer.save's layout, the keys the teacher reads) at 64 px."""
    model_cfg = {"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                 "heads": {"detection": {"type": "yolo_head", "num_classes": 80}}}
    torch.manual_seed(0)
    model = UnifiedModel.from_config(model_cfg)
    save_checkpoint(VFMKD_RUN, {"model": model.state_dict(), "epoch": 0, "metrics": {},
                                "config": {"model": model_cfg, "data": {"dataset": "coco128", "img_size": 64}}})
    yield
    shutil.rmtree(VFMKD_RUN.parent, ignore_errors=True)


def _takes(name: str, key: str) -> bool:
    return key in inspect.signature(TEACHERS.get(name).__init__).parameters


@pytest.fixture(scope="module")
def teachers():
    """One build per teacher for the whole module (random init is still a full model build)."""
    logging.getLogger("vfmkd").setLevel(logging.ERROR)  # the random-init banner, once per build
    return {name: TEACHERS.build(name, **kw) for name, kw in TEACHER_CASES.items()}


@pytest.fixture(scope="module")
def canvases():
    """Two (3, 96, 112) float canvases in [0, 1] from a real photo, and content boxes of odd sizes."""
    img = np.array(Image.open(IMAGE).convert("RGB").resize((112, 96), Image.BILINEAR))
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    images = torch.stack([x, x.flip(-1)])
    boxes = torch.tensor([[5, 7, 112, 90], [0, 30, 41, 96]], dtype=torch.int64)  # 107 x 83 and 41 x 66
    return images, boxes


def test_every_registered_teacher_has_a_case():
    # vfmkd's own teachers; a user's teacher registered by another test (custom_imports) doesn't count.
    builtin = {n for n in TEACHERS.names() if TEACHERS.get(n).__module__.startswith("vfmkd.")}
    missing = sorted(builtin - set(TEACHER_CASES))
    assert not missing, f"registered teachers without a contract case in TEACHER_CASES: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_forward_features_match_feature_specs(name, teachers):
    teacher = teachers[name]
    s = teacher.input_size
    img = np.array(Image.open(IMAGE).convert("RGB"))
    feats, batch = teacher.extract_features([img, img[:50, :31]])
    assert batch.pixels.shape == (2, 3, s, s)
    specs = teacher.feature_specs()
    assert sorted(feats) == sorted(spec.name for spec in specs)
    assert teacher.primary_feature in feats
    for spec in specs:
        assert feats[spec.name].shape == (2, spec.channels, s // spec.stride, s // spec.stride), spec
        assert feats[spec.name].dtype == torch.float32 and torch.isfinite(feats[spec.name]).all()


@pytest.mark.parametrize("name", NAMES)
def test_preprocess_geometry_is_input_affine(name, teachers):
    teacher = teachers[name]
    s = teacher.input_size
    images = [np.zeros((h, w, 3), dtype=np.uint8) for h, w in ODD_SIZES]
    batch = teacher.preprocess(images)
    for i, (h, w) in enumerate(ODD_SIZES):
        expected = torch.tensor(type(teacher).input_affine(h, w, s), dtype=torch.float32)
        assert torch.equal(batch.affine[i], expected), (h, w)
        vh, vw = batch.valid_hw[i].tolist()
        sx, sy, _, _ = type(teacher).input_affine(h, w, s)
        if name in CANVAS_INPUT:
            assert (vh, vw) == (s, s)
        else:
            assert (vh, vw) == (round(h * sy), round(w * sx)) and vh <= s and vw <= s


def test_input_affine_rounds_halves_up_like_sam(teachers):
    """5 x 128 at 64: the short side is 2.5 px; segment-anything's ResizeLongestSide makes it 3 rows
    (int(x + 0.5)); Python's round() (the old BaseTeacher.input_affine) said 2 and so mispredicted
    the geometry of a live pass."""
    assert resized_hw(5, 128, 64) == (3, 64) and resized_hw(45, 128, 64) == (23, 64)
    sam = teachers["sam"]
    assert sam.input_size == 64
    for h, w in [(5, 128), (45, 128), (128, 45)]:
        batch = sam.preprocess([np.zeros((h, w, 3), dtype=np.uint8)])
        assert torch.equal(batch.affine[0], torch.tensor(BaseTeacher.input_affine(h, w, 64), dtype=torch.float32))
    assert BaseTeacher.input_affine(5, 128, 64) == (0.5, 3 / 5, 0.0, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_preprocess_crops_on_device_matches_the_numpy_path(name, teachers, canvases):
    teacher = teachers[name]
    images, boxes = canvases
    live = teacher.preprocess_crops(images, boxes)
    if name in CANVAS_INPUT:  # the whole canvas, resized to S; OnlineTeacher's canvas -> teacher affine = the scale
        s = teacher.input_size
        ky, kx = s / images.shape[-2], s / images.shape[-1]
        assert torch.allclose(live.pixels, F.interpolate(images, size=(s, s), mode="bilinear", antialias=True))
        assert live.affine.dtype == torch.float32 and live.valid_hw.dtype == torch.int64
        assert torch.allclose(live.affine,
                              torch.tensor([[kx, ky, kx * x1, ky * y1] for x1, y1, _, _ in boxes.tolist()]))
        assert torch.equal(live.valid_hw, torch.full((2, 2), s))
        composed = live.affine[:, 2:] - live.affine[:, :2] * boxes[:, :2].float()
        assert torch.allclose(composed, torch.zeros(2, 2), atol=1e-5)
        return
    # the reference: the default implementation, i.e. uint8 crops through the numpy preprocess
    ref = BaseTeacher.preprocess_crops(teacher, images, boxes)
    assert live.pixels.shape == ref.pixels.shape == (2, 3, teacher.input_size, teacher.input_size)
    assert live.pixels.device == images.device and live.affine.device == images.device
    assert live.affine.dtype == ref.affine.dtype and live.valid_hw.dtype == ref.valid_hw.dtype
    assert torch.equal(live.affine, ref.affine) and torch.equal(live.valid_hw, ref.valid_hw)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        want = type(teacher).input_affine(y2 - y1, x2 - x1, teacher.input_size)
        assert torch.equal(live.affine[i], torch.tensor(want, dtype=torch.float32))
    # Pixels differ only by resampling. The numpy path rounds the canvas to uint8 and resizes with PIL
    # (SAM: torchvision's resize of a PIL image, bilinear; DINO: bicubic; both antialiased, in fixed
    # point), the device path resizes the float canvas with torch (antialiased bilinear / bicubic;
    # SAM2 runs the very same torch op in both). One grey level is 1 / (255 * std) ~ 0.017 normalised
    # units (std ~ 0.23 in all recipes); measured here: mean 0.0035, max 0.019 (about one level, the
    # uint8 rounding). Bounds: mean 0.01 (0.6 level), max 0.06 (3.5 levels). Padding is zero in both.
    diff = (live.pixels - ref.pixels).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.06, (diff.mean(), diff.max())
    for i, (h, w) in enumerate(live.valid_hw.tolist()):
        assert diff[i, :, h:].sum() == 0 and diff[i, :, :, w:].sum() == 0


@pytest.mark.parametrize("name", NAMES)
def test_fingerprint_is_derived_from_the_config_and_stable(name, teachers):
    teacher, kwargs = teachers[name], TEACHER_CASES[name]
    cls = TEACHERS.get(name)
    assert teacher.fingerprint() == cls.config_fingerprint(**kwargs)
    assert teacher.fingerprint().family == cls.family and teacher.fingerprint().preprocessing
    assert cls.config_fingerprint(**kwargs) == teacher.fingerprint()  # a pure function of the config
    if name not in OFFICIAL:  # a second build of the timm families (a ViT-B for RADIO) proves nothing more
        assert TEACHERS.build(name, **kwargs).fingerprint() == teacher.fingerprint()
    if _takes(name, "seed"):
        assert cls.config_fingerprint(**{**kwargs, "seed": 1}) != teacher.fingerprint()


@pytest.mark.parametrize("name", NAMES)
def test_teachers_are_frozen_and_stay_in_eval_mode(name, teachers):
    teacher = teachers[name]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not any(m.training for m in teacher.modules())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert isinstance(teacher.settings, TeacherSettings) and teacher.settings.variant == TEACHER_CASES[name]["variant"]


@pytest.mark.parametrize("name", NAMES)
def test_shared_config_errors(name):
    """The shared keys the family takes fail the same way for every family, before any model is built."""
    cls, kwargs = TEACHERS.get(name), TEACHER_CASES[name]
    for bad, hint in [({"init": "rand"}, "teacher.init='rand' is not valid. Did you mean 'random'"),
                      ({"dtype": "fp16"}, "Choose one of: auto, float32, bfloat16, float16"),
                      ({"device": "gpu"}, "teacher.device='gpu' is not a torch device"),
                      ({"input_size": 0}, "teacher.input_size must be a positive integer"),
                      ({"variant": "nope"}, "teacher.variant='nope' is not valid")]:
        if not _takes(name, next(iter(bad))):
            continue
        with pytest.raises(ConfigError, match=hint):
            cls.config_fingerprint(**{**kwargs, **bad})
        with pytest.raises(ConfigError, match=hint):
            cls(**{**kwargs, **bad})
    with pytest.raises(ConfigError, match="unknown key 'teacher.inputsize'.*Did you mean 'input_size'"):
        cls.config_fingerprint(inputsize=64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_refused_at_build_but_fingerprints():
    with pytest.raises(ConfigError, match=r"teacher.device=cuda but CUDA is not available on this machine; "
                                          r"set teacher.device=auto .* or teacher.device=cpu"):
        SamTeacher(init="random", input_size=64, device="cuda")
    # an offline run on a CPU machine still checks a cache written by a CUDA teacher
    assert SamTeacher.config_fingerprint(init="random", input_size=64, device="cuda",
                                         dtype="bfloat16").dtype == "bfloat16"


def test_old_size_key_is_renamed_to_variant():
    with pytest.raises(ConfigError, match="variant"):
        TEACHERS.build("sam", model_type="vit_b", init="random", input_size=64)


# Fingerprints of these configs as the code before the TeacherSettings refactor computed them (caches
# already written carry them): they must never change. Files "base.pth" = b"base", "lora.pt" = b"lora".
_SAM_PRE = "sam:resize-longest-side,pad-bottom-right,mean=123.675/116.280/103.530,std=58.395/57.120/57.375"
_SAM2_PRE = "sam2:resize-square-no-aspect,bilinear-antialias,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"
_DINO_PRE = ":resize-longest-side-bicubic,pad-bottom-right,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"
_BASE = "cae662172fd450bb0cd710a769079c05bfc5d8e35efa6576edc7d0377afdd4a2"  # sha256(b"base")
_LORA = "d339f720de1fd92a672df9ef19a8cdbda6171cbf33fcd35ad95c46f8aebaf628"  # sha256(b"lora")
PINNED = [
    ("sam", dict(init="random", input_size=256), ("vit_b", "random-init:seed0", 256, "float32", _SAM_PRE)),
    (
        "sam",
        dict(variant="vit_l", checkpoint="base.pth", input_size=512, dtype="bfloat16", seed=5),
        ("vit_l", _BASE, 512, "float32", _SAM_PRE),
    ),
    (
        "sam",
        dict(variant="vit_h"),
        (
            "vit_h",
            "unknown (checkpoint weights/sam_vit_h_4b8939.pth is not on this machine)",
            1024,
            "float32",
            _SAM_PRE,
        ),
    ),
    (
        "sam",
        dict(init="random", input_size=64, dtype="bfloat16", device="cuda:0"),
        ("vit_b", "random-init:seed0", 64, "bfloat16", _SAM_PRE),
    ),
    (
        "lora_sam",
        dict(init="random", input_size=128),
        ("vit_b+lora_r8_a8", "random-init:seed0+no-lora", 128, "float32", _SAM_PRE),
    ),
    (
        "lora_sam",
        dict(variant="vit_b", checkpoint="base.pth", lora_checkpoint="lora.pt", lora_rank=4, lora_alpha=16.0),
        ("vit_b+lora_r4_a16", f"{_BASE}+{_LORA}", 1024, "float32", _SAM_PRE),
    ),
    (
        "lora_sam",
        dict(lora_checkpoint="gone.pt", lora_alpha=2),
        (
            "vit_b+lora_r8_a2",
            "unknown (unknown (checkpoint weights/sam_vit_b_01ec64.pth is not on this machine); "
            "unknown (LoRA checkpoint gone.pt is not on this machine))",
            1024,
            "float32",
            _SAM_PRE,
        ),
    ),
    (
        "sam2",
        dict(init="random", input_size=128, seed=3),
        ("sam2.1_hiera_tiny", "random-init:seed3", 128, "float32", _SAM2_PRE),
    ),
    (
        "sam2",
        dict(variant="sam2_hiera_large", checkpoint="base.pth", input_size=512, dtype="float16"),
        ("sam2_hiera_large", _BASE, 512, "float32", _SAM2_PRE),
    ),
    ("dino", dict(init="random"), ("vits16", "random-init:seed0", 224, "float32", "dino" + _DINO_PRE)),
    (
        "dino",
        dict(variant="vitb8", checkpoint="base.pth", input_size=112),
        ("vitb8", _BASE, 112, "float32", "dino" + _DINO_PRE),
    ),
    (
        "dinov2",
        dict(init="random", input_size=112, seed=3),
        ("vits14", "random-init:seed3", 112, "float32", "dinov2" + _DINO_PRE),
    ),
    (
        "dinov2",
        dict(variant="vits14_reg4"),
        (
            "vits14_reg4",
            "unknown (checkpoint weights/dinov2_vits14_reg4_pretrain.pth is not on this machine)",
            518,
            "float32",
            "dinov2" + _DINO_PRE,
        ),
    ),
    (
        "dinov2",
        dict(init="random", dtype="float16", device="cuda"),
        ("vits14", "random-init:seed0", 518, "float16", "dinov2" + _DINO_PRE),
    ),
]


@pytest.mark.parametrize("name, kwargs, expected", PINNED)
def test_fingerprints_are_unchanged(name, kwargs, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.pth").write_bytes(b"base")
    (tmp_path / "lora.pt").write_bytes(b"lora")
    fp = TEACHERS.get(name).config_fingerprint(**kwargs)
    assert (fp.family, fp.variant, fp.weights, fp.input_size, fp.dtype, fp.preprocessing) == (name, *expected)


# The timm-built teachers of 2025-26 (DINOv3, DINOv3 ConvNeXt, C-RADIO, PE-core) on files in their official
# layouts (tests/official_layouts.py writes them from the contract builds above): variant auto reads the file,
# every tensor arrives, another model's file is refused by one message naming what it is.
@pytest.fixture(scope="module")
def official_files(teachers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    return {name: write_official(name, teachers[name].model, folder) for name in OFFICIAL}


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_layout_loads_with_variant_auto(name, teachers, official_files):
    built = TEACHERS.build(name, checkpoint=str(official_files[name]), input_size=64)
    random_teacher = teachers[name]
    assert built.variant == TEACHER_CASES[name]["variant"] and "read from" in built.settings.variant_source
    mine, theirs = built.model.state_dict(), random_teacher.model.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:  # RADIO's patch projection has no bias: timm's comes back zero
        if key != "patch_embed.proj.bias" or name != "radio":
            assert torch.equal(mine[key], theirs[key]), key
    if name == "radio":  # RADIO's summary: the CLS tokens the file's summary_idxs name, concatenated
        assert built.summary_idxs == (0, 2) and built.summary_feature == "summary"
        x = torch.randn(1, 3, 64, 64)
        tokens = built.model.forward_features(x)
        feats = built.forward_features(x)
        assert torch.allclose(feats["summary"].view(1, 2, -1), tokens[:, [0, 2]], atol=1e-5)


@pytest.mark.parametrize("name, other, names", [
    ("dinov3", "radio", "C-RADIO checkpoint"), ("radio", "dinov3", "DINOv3 ViT checkpoint"),
    ("dinov3_convnext", "dinov3", "DINOv3 ViT checkpoint"), ("dinov3", "dinov3_convnext", "ConvNeXt checkpoint"),
    ("pe_core", "radio", "C-RADIO checkpoint"), ("radio", "pe_core", "PE-core"),
])
def test_another_models_official_file_is_refused_naming_it(name, other, names, official_files):
    with pytest.raises(CheckpointError, match=names):
        TEACHERS.get(name)(checkpoint=str(official_files[other]), input_size=64)

