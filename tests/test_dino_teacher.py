"""DINO / DINOv2 teachers against timm's own models, on real coco128 images.

Checkpoints are written in Meta's official key layout from randomly initialised timm models (no
weights can be downloaded here):

* DINO v1 (``dino_deitsmall16_pretrain.pth``): facebookresearch/dino's VisionTransformer uses timm's
  parameter names (``cls_token``, ``pos_embed`` (1, 1 + 14², C) at 224, ``patch_embed.proj``,
  ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``) and the released
  backbones have no head, so the official file is the state_dict of timm's ``num_classes=0`` model at
  224 (150 tensors for ViT-B/16, as the real file).
* DINOv2 (``dinov2_vits14[_reg4]_pretrain.pth``): the same names plus LayerScale ``ls1/ls2.gamma``
  (also timm's), and the differences timm's converter (``checkpoint_filter_fn`` -> ``_convert_dinov2``)
  undoes: a pretraining-only ``mask_token`` (1, C); ``pos_embed`` at 518 with a class-token row
  (1, 1 + 37², C); for the register models ``register_tokens`` (1, 4, C) and a ``cls_token`` without its
  position row (timm's reg4 models fold that row into ``cls_token``, their ``pos_embed`` has none);
  ViT-g's SwiGLU is ``w12``/``w3`` where timm has ``fc1``/``fc2``. :func:`to_official_dinov2` is the
  inverse (175 tensors for ViT-S/14, as the real file).

The reference is timm's model itself run on the teacher's preprocessed pixels; for DINOv2 the teacher
runs at 224 while the checkpoint is at 518, and the reference (timm's ``dynamic_img_size`` mode)
resamples ``pos_embed`` at run time, an independent path to the teacher's load-time conversion.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.dino_teacher import DinoTeacher, Dinov2Teacher, detect_dino_variant
from vfmkd.utils.checkpoint import sha256_of_file

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted((REPO / "datasets/coco128/images/val2017").glob("*.jpg"))
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session")
def images():
    if len(IMAGES) < 2:
        pytest.skip("coco128 val2017 images are not in datasets/coco128")
    return [_rgb(IMAGES[0]), _rgb(IMAGES[1])]  # 426 x 640 landscape, 640 x 586 portrait


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """timm initialises cls/reg tokens near 0 and LayerScale at 1e-5 (blocks ~ identity): make them
    matter so a wrongly loaded tensor shows in the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("cls_token", "reg_token"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(".gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def to_official_dinov2(model: torch.nn.Module, seed: int = 0, swiglu: bool = False) -> dict:
    """Meta's DINOv2 layout from a timm DINOv2 model built at 518 (the inverse of timm's converter);
    ``swiglu`` for ViT-g, whose fused SwiGLU weights Meta names w12/w3."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    c = sd["cls_token"].shape[-1]
    g = torch.Generator().manual_seed(seed)
    out = {"mask_token": torch.randn(1, c, generator=g)}
    if "reg_token" in sd:  # timm folded the class position row into cls_token and dropped it
        cls_pos = torch.randn(1, 1, c, generator=g) * 0.5
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, sd.pop("pos_embed")], dim=1)
    for k, v in sd.items():
        out[k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3") if swiglu else k] = v
    return out


@pytest.fixture(scope="session")
def dino_vits16(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    _randomise(model, 0)
    path = tmp_path_factory.mktemp("weights") / "dino_deitsmall16_pretrain.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="session", params=["vits14", "vits14_reg4"])
def dinov2_ckpt(request, tmp_path_factory):
    variant = request.param
    name = "vit_small_patch14_reg4_dinov2" if variant.endswith("reg4") else "vit_small_patch14_dinov2"
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=518, dynamic_img_size=True).eval()
    _randomise(model, 1)
    official = to_official_dinov2(model)
    assert official["pos_embed"].shape == (1, 1 + 37 * 37, 384) and official["mask_token"].shape == (1, 384)
    assert len(official) == 175 + (1 if variant.endswith("reg4") else 0)  # the released files' tensor count
    path = tmp_path_factory.mktemp("weights") / f"dinov2_{variant}_pretrain.pth"
    torch.save(official, path)
    return variant, path, model


def _split(tokens: torch.Tensor, prefix: int, grid: int):
    b, _, c = tokens.shape
    return tokens[:, prefix:].reshape(b, grid, grid, c).permute(0, 3, 1, 2), tokens[:, 0].reshape(b, c, 1, 1)


def test_dino_vits16_official_checkpoint_matches_timm(dino_vits16, images):
    path, model = dino_vits16
    teacher = DinoTeacher(checkpoint=str(path))  # defaults: vits16 at 224
    feats, batch = teacher.extract_features(images)
    with torch.no_grad():
        ref_patch, ref_cls = _split(model.forward_features(batch.pixels), 1, 14)
    assert feats["patch_tokens"].shape == (2, 384, 14, 14) and feats["cls_token"].shape == (2, 384, 1, 1)
    torch.testing.assert_close(feats["patch_tokens"], ref_patch, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats["cls_token"], ref_cls, atol=1e-5, rtol=0)
    assert [(s.name, s.channels, s.stride) for s in teacher.feature_specs()] == [
        ("patch_tokens", 384, 16),
        ("cls_token", 384, 224),
    ]
    assert teacher.primary_feature == "patch_tokens"
    fp = teacher.fingerprint()
    assert (fp.family, fp.variant, fp.input_size, fp.dtype) == ("dino", "vits16", 224, "float32")
    assert fp.weights == sha256_of_file(path) and fp.preprocessing.startswith("dino:resize-longest-side")
    assert DinoTeacher.config_fingerprint(checkpoint=str(path)) == fp


def test_dinov2_official_checkpoint_matches_timm(dinov2_ckpt, images, caplog):
    variant, path, model = dinov2_ckpt
    kw = dict(variant=variant, checkpoint=str(path), input_size=224)  # 16 x 16 patches, pos_embed from 37 x 37
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        teacher = TEACHERS.build("dinov2", **kw)
    assert f"Loaded DINOv2 checkpoint from: {path}" in caplog.text
    feats, batch = teacher.extract_features(images)
    prefix = 5 if variant.endswith("reg4") else 1  # class token (+ 4 registers) precede the patches
    assert teacher.model.num_prefix_tokens == prefix
    with torch.no_grad():
        ref_patch, ref_cls = _split(model.forward_features(batch.pixels), prefix, 16)
    assert feats["patch_tokens"].shape == (2, 384, 16, 16) and feats["cls_token"].shape == (2, 384, 1, 1)
    torch.testing.assert_close(feats["patch_tokens"], ref_patch, atol=2e-5, rtol=0)
    torch.testing.assert_close(feats["cls_token"], ref_cls, atol=2e-5, rtol=0)
    # the converted class token is the source model's (registers: the position row folded back in)
    torch.testing.assert_close(teacher.model.cls_token, model.cls_token, atol=1e-6, rtol=0)
    fp = teacher.fingerprint()
    assert (fp.family, fp.variant, fp.input_size, fp.weights) == ("dinov2", variant, 224, sha256_of_file(path))
    assert Dinov2Teacher.config_fingerprint(**kw) == fp


def test_preprocessing_geometry_and_normalisation(images):
    teacher = DinoTeacher(init="random", input_size=224)
    land, port = images
    assert land.shape[:2] == (426, 640) and port.shape[:2] == (640, 586)
    marked = []
    for img, (x0, y0) in ((land, (500, 300)), (port, (100, 520))):
        img = img.copy()
        img[y0 - 10:y0 + 10, x0 - 10:x0 + 10] = (255, 0, 255)  # a magenta 20 x 20 square centred at (x0, y0)
        marked.append((img, (x0, y0)))
    batch = teacher.preprocess([m for m, _ in marked])
    assert batch.pixels.shape == (2, 3, 224, 224) and batch.pixels.dtype == torch.float32
    # long side -> 224: 426 * 0.35 = 149.1 -> 149 rows; 586 * 0.35 = 205.1 -> 205 columns
    assert batch.valid_hw.tolist() == [[149, 224], [224, 205]]
    torch.testing.assert_close(batch.affine, torch.tensor([[224 / 640, 149 / 426, 0, 0], [205 / 586, 224 / 640, 0, 0]]))
    for i, (img, (x0, y0)) in enumerate(marked):
        h, w = batch.valid_hw[i].tolist()
        # ImageNet mean/std on a bicubic resize of the image, zero (= mean colour) padding bottom/right
        ref = torch.from_numpy(np.array(Image.fromarray(img).resize((w, h), Image.BICUBIC))).permute(2, 0, 1) / 255.0
        torch.testing.assert_close(batch.pixels[i, :, :h, :w], (ref - MEAN) / STD, atol=1e-5, rtol=0)
        pad = torch.ones(224, 224, dtype=torch.bool)
        pad[:h, :w] = False
        assert pad.any() and batch.pixels[i][:, pad].abs().max() == 0
        # the affine carries an original pixel onto the canvas: find the square's centre there
        rgb = batch.pixels[i] * STD + MEAN
        hit = (rgb[0] > 0.8) & (rgb[1] < 0.2) & (rgb[2] > 0.8)
        ys, xs = torch.nonzero(hit, as_tuple=True)
        sx, sy, ox, oy = batch.affine[i].tolist()
        # canvas pixel j covers [j, j + 1): its centre is j + 0.5
        assert abs(xs.float().mean().item() + 0.5 - (x0 * sx + ox)) < 1.0
        assert abs(ys.float().mean().item() + 0.5 - (y0 * sy + oy)) < 1.0


def test_checkpoint_of_another_variant_is_detected_before_loading(dinov2_ckpt, tmp_path, monkeypatch):
    variant, reg_path, _ = dinov2_ckpt
    # A real DINOv2 ViT-B/14 layout (timm on the meta device); stride-0 tensors keep the file tiny.
    with torch.device("meta"):
        vitb = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    sd = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in vitb.state_dict().items()}
    sd["mask_token"] = torch.zeros(()).expand(1, 768)
    vitb_path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(sd, vitb_path)
    assert detect_dino_variant(sd) == ("dinov2", "vitb14")

    def boom(*args, **kwargs):
        raise AssertionError("load_state_dict must not be reached")

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", boom)
    with pytest.raises(CheckpointError) as err:
        Dinov2Teacher(variant="vits14", checkpoint=str(vitb_path))
    msg = str(err.value)
    assert "is a DINOv2 ViT-B/14 backbone (vitb14) but teacher.variant is vits14" in msg
    assert "teacher.variant=vitb14" in msg and "python tools/download_weights.py --model dinov2_vits14" in msg

    other = "vits14" if variant.endswith("reg4") else "vits14_reg4"  # registers or not
    with pytest.raises(CheckpointError) as err:
        Dinov2Teacher(variant=other, checkpoint=str(reg_path))
    label = "ViT-S/14 with 4 registers" if variant.endswith("reg4") else "ViT-S/14"
    assert f"is a DINOv2 {label} backbone ({variant}) but teacher.variant is {other}" in str(err.value)

    with pytest.raises(CheckpointError) as err:  # a DINOv2 file given to the DINO v1 teacher
        DinoTeacher(variant="vits16", checkpoint=str(reg_path))
    assert f"use the dinov2 teacher (type: dinov2, teacher.variant={variant})" in str(err.value)

    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, resnet)
    with pytest.raises(CheckpointError, match="not a DINO/DINOv2 ViT state_dict"):
        DinoTeacher(checkpoint=str(resnet))


def test_missing_checkpoint_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"weights/dinov2_vits14_reg4_pretrain\.pth") as err:
        Dinov2Teacher(variant="vits14_reg4")
    msg = str(err.value)
    assert "python tools/download_weights.py --model dinov2_vits14_reg4" in msg and "teacher.init=random" in msg
    with pytest.raises(CheckpointError) as err:
        DinoTeacher(variant="vitb8", checkpoint=str(tmp_path / "nope.pth"))
    assert "python tools/download_weights.py --model dino_vitb8" in str(err.value)
    # an offline run can still fingerprint the config: the weights are 'unknown'
    assert Dinov2Teacher.config_fingerprint().weights.startswith("unknown")


def test_random_init_is_loud_seeded_and_fingerprinted(caplog):
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        a = Dinov2Teacher(init="random", input_size=112, seed=3)
    banner = [r for r in caplog.records if r.levelno == logging.WARNING and "RANDOMLY INITIALISED" in r.getMessage()]
    assert banner and "MEANINGLESS" in banner[0].getMessage() and "--model dinov2_vits14" in banner[0].getMessage()
    assert a.fingerprint().weights == "random-init:seed3"
    assert Dinov2Teacher.config_fingerprint(init="random", input_size=112, seed=3) == a.fingerprint()
    rng = torch.random.get_rng_state()
    b = Dinov2Teacher(init="random", input_size=112, seed=3)  # the weights come from the seed alone ...
    torch.testing.assert_close(a.model.state_dict(), b.model.state_dict(), atol=0, rtol=0)
    assert torch.equal(torch.random.get_rng_state(), rng)  # ... and leave the global RNG alone


@pytest.mark.parametrize(
    "cls, kwargs, hint",
    [
        (Dinov2Teacher, {"input_size": 500}, "multiple of 14 .*nearest valid: 490 or 504"),
        (DinoTeacher, {"input_size": 100, "variant": "vits8"}, "multiple of 8 .*nearest valid: 96 or 104"),
        (Dinov2Teacher, {"variant": "vits14reg4"}, "Did you mean 'vits14_reg4'"),
        (DinoTeacher, {"variant": "vits14"}, "Did you mean 'vits16'"),
    ],
)
def test_bad_config_values(cls, kwargs, hint):
    with pytest.raises(ConfigError, match=hint):
        cls(init=kwargs.pop("init", "random"), **kwargs)


def test_cached_through_prepare_teacher_features(tmp_path):
    from vfmkd.engine.commands import prepare_features as ptf

    out = tmp_path / "dinov2"
    args = ["--teacher", "dinov2", "--dataset", "coco128", "--splits", "val2017", "--limit", "2", "--batch-size", "2",
            "--output", str(out), "--no-progress", "--features", "all", "teacher.init=random", "teacher.input_size=112"]
    assert ptf.main(args) == 0
    with h5py.File(out / "val2017.h5", "r") as f:
        assert f["features/patch_tokens"].shape == (2, 384, 8, 8)
        assert f["features/cls_token"].shape == (2, 384, 1, 1)
        assert f["done"][:].all() and np.isfinite(f["stats/cls_token/std"][:]).all()
        fp = json.loads(f.attrs["fingerprint"])
        assert (fp["family"], fp["variant"], fp["weights"], fp["input_size"]) == (
            "dinov2",
            "vits14",
            "random-init:seed0",
            112,
        )
        assert fp == Dinov2Teacher.config_fingerprint(init="random", input_size=112).as_dict()
        assert [s["name"] for s in json.loads(f.attrs["feature_specs"])] == ["patch_tokens", "cls_token"]
        assert f["valid_hw"][0].tolist() == [75, 112]  # 426 x 640 -> 74.55 -> 75 rows
