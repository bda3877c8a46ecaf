"""LoraSamTeacher: SAM (segment-anything) + merged LoRA on the image encoder's qkv layers."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import sam_model_registry

from vfmkd.core.config import read_yaml, teacher_kwargs
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.lora_sam_teacher import LoraSamTeacher, lora_key
from vfmkd.teachers.sam_teacher import SamTeacher
from vfmkd.utils.checkpoint import sha256_of_file

# Compares two teachers' features bit for bit: runs on two threads under xdist (conftest).
pytestmark = pytest.mark.bitexact

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted((REPO / "datasets/coco128/images/val2017").glob("*.jpg"))
SIZE, RANK, ALPHA = 256, 4, 8.0  # scaling 2


@pytest.fixture(scope="session")
def images():
    if not IMAGES:
        pytest.skip("coco128 val2017 images are not in datasets/coco128")
    return [np.array(Image.open(IMAGES[0]).convert("RGB"))]  # 426 x 640


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory):
    """segment-anything's own random vit_b in the official layout (the 'base' a LoRA was trained on)."""
    torch.manual_seed(0)
    model = sam_model_registry["vit_b"]()
    with torch.no_grad():  # zero-initialised: make it non-zero so the tests see it
        model.image_encoder.pos_embed.normal_(std=0.02)
    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_01ec64.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def base_feats(base_ckpt, images):
    """The plain SAM teacher's features and the teacher itself (the reference)."""
    teacher = SamTeacher(checkpoint=str(base_ckpt), input_size=SIZE)
    feats, _ = teacher.extract_features(images)
    return teacher, feats


def make_lora(blocks=12, dim=768, rank=RANK, zero_b=False, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(blocks):
        sd[lora_key(i, "A")] = torch.randn(rank, dim, generator=g) * std
        sd[lora_key(i, "B")] = torch.zeros(3 * dim, rank) if zero_b else torch.randn(3 * dim, rank, generator=g) * std
    return sd


def _save(tmp_path: Path, sd, name="lora.pt") -> Path:
    path = tmp_path / name
    torch.save(sd, path)
    return path


def _kw(base_ckpt, lora_path, **extra):
    return {"checkpoint": str(base_ckpt), "lora_checkpoint": str(lora_path), "lora_rank": RANK, "lora_alpha": ALPHA,
            "input_size": SIZE, **extra}


def test_zero_b_lora_gives_the_base_features(base_ckpt, base_feats, images, tmp_path):
    _, ref = base_feats
    lora = _save(tmp_path, {"model": make_lora(zero_b=True)})  # a {"model": sd} wrapper is fine too
    teacher = LoraSamTeacher(**_kw(base_ckpt, lora))
    feats, _ = teacher.extract_features(images)
    for name in ("trunk", "image_embeddings"):
        torch.testing.assert_close(feats[name], ref[name], atol=0, rtol=0)


def test_lora_changes_features_as_an_unmerged_adapter_would(base_ckpt, base_feats, images, tmp_path, caplog):
    base, ref = base_feats
    sd = make_lora()
    lora = _save(tmp_path, sd)
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        teacher = TEACHERS.build("lora_sam", **_kw(base_ckpt, lora))
    assert "Merged LoRA (rank 4, alpha 8)" in caplog.text
    feats, batch = teacher.extract_features(images)
    assert (feats["image_embeddings"] - ref["image_embeddings"]).abs().max() > 1e-2  # the LoRA matters

    # Reference: the plain base model with the adapter applied in forward, qkv(x) + alpha/r * x A^T B^T.
    def lora_hook(a: torch.Tensor, b: torch.Tensor):
        return lambda m, inp, out: out + (ALPHA / RANK) * (inp[0] @ a.T @ b.T)

    hooks = [
        blk.attn.qkv.register_forward_hook(lora_hook(sd[lora_key(i, "A")], sd[lora_key(i, "B")]))
        for i, blk in enumerate(base.sam.image_encoder.blocks)
    ]
    try:
        want, _ = base.extract_features(images)
    finally:
        for h in hooks:
            h.remove()
    for name in ("trunk", "image_embeddings"):
        torch.testing.assert_close(feats[name], want[name], atol=2e-4, rtol=1e-4)

    assert batch.valid_hw[0].tolist() == [170, 256]  # SAM's geometry, unchanged

    fp = teacher.fingerprint()
    assert (fp.family, fp.variant) == ("lora_sam", "vit_b+lora_r4_a8")
    assert fp.weights == f"{sha256_of_file(base_ckpt)}+{sha256_of_file(lora)}"
    assert LoraSamTeacher.config_fingerprint(**_kw(base_ckpt, lora)) == fp
    assert fp.preprocessing == base.fingerprint().preprocessing
    other = LoraSamTeacher.config_fingerprint(**_kw(base_ckpt, lora, lora_alpha=16.0))
    assert other.variant == "vit_b+lora_r4_a16" and other != fp
    gone = LoraSamTeacher.config_fingerprint(**_kw(base_ckpt, tmp_path / "elsewhere.pt"))
    assert gone.weights.startswith("unknown") and "elsewhere.pt" in gone.weights


def _vit_l_keys_lora():
    return make_lora(blocks=24, dim=1024)


def _drop(sd, key):
    sd = dict(sd)
    del sd[key]
    return sd


def _full_sam_sd():
    with torch.device("meta"):
        model = sam_model_registry["vit_b"]()
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "make, kwargs, expected",
    [
        (
            _vit_l_keys_lora,
            {"variant": "vit_b"},
            [
                r"adapters for 24 blocks \(0-23\) but SAM vit_b has 12 image-encoder "
                r"blocks",
                "blocks 12-23 do not exist",
                "take 1024 input features but vit_b's qkv layers take 768",
                "trained on a SAM vit_l: set teacher.variant=vit_l",
            ],
        ),
        (lambda: make_lora(blocks=10), {}, [r"adapters for 10 blocks \(0-9\)", "missing blocks 10-11"]),
        (lambda: make_lora(dim=1024), {}, ["take 1024 input features but vit_b's qkv layers take 768"]),
        (
            lambda: {**make_lora(), lora_key(0, "B"): torch.zeros(768, RANK)},
            {},
            [r"block 0 has lora_B of shape \(768, 4\)", r"must be \(3 \* 768, 4\) = \(2304, 4\)"],
        ),
        (
            lambda: make_lora(rank=8),
            {},
            [r"has LoRA rank 8 \(lora_A \(8, 768\)\) but teacher.lora_rank=4", "set teacher.lora_rank=8"],
        ),
        (
            lambda: {**make_lora(), lora_key(5, "A"): torch.zeros(2, 768), lora_key(5, "B"): torch.zeros(2304, 2)},
            {},
            ["mixes LoRA ranks", "rank 2: blocks 5", "rank 4: blocks 0-4, 6-11"],
        ),
        (
            lambda: _drop(make_lora(), lora_key(3, "B")),
            {},
            [r"block 3 has lora_A but no lora_B \('image_encoder.blocks.3.attn.qkv.lora_B' is missing"],
        ),
        (
            lambda: {**make_lora(), "epoch": torch.tensor(3)},
            {},
            ["1 key\\(s\\) that are not qkv LoRA matrices", "epoch"],
        ),
        (_full_sam_sd, {}, ["is a full SAM state_dict, not a LoRA file"]),
        (lambda: {"w": torch.zeros(3)}, {}, ["holds no LoRA matrices"]),
        (
            lambda: {**make_lora(), lora_key(2, "A"): torch.full((RANK, 768), float("nan"))},
            {},
            ["NaN/inf values in blocks 2"],
        ),
        (make_lora, {"variant": "vit_h"}, ["does not match the base SAM vit_h", "trained on a SAM vit_b"]),
    ],
)
def test_mismatched_lora_files_are_named_before_building(make, kwargs, expected, tmp_path, monkeypatch):
    lora = _save(tmp_path, make())

    def boom(*args, **kwargs):
        raise AssertionError("the base model must not be loaded or built for a mismatched LoRA file")

    monkeypatch.setattr("vfmkd.teachers.loading.load_checkpoint", boom)  # the base SAM checkpoint loading
    with pytest.raises(CheckpointError) as err:
        LoraSamTeacher(checkpoint=str(tmp_path / "base.pth"), lora_checkpoint=str(lora), lora_rank=RANK, **kwargs)
    msg = str(err.value)
    assert str(lora) in msg
    for pattern in expected:
        assert re.search(pattern, msg), (pattern, msg)


def test_base_file_of_another_size_is_named_before_the_lora(base_ckpt, tmp_path, monkeypatch):
    """variant=vit_l with a vit_b base and its vit_b LoRA: the base file is at fault, not the LoRA."""
    lora = _save(tmp_path, make_lora())

    def boom(*args, **kwargs):
        raise AssertionError("no SAM may be built for a base file of another size")

    monkeypatch.setattr("vfmkd.teachers.sam_teacher.sam_model_registry", {"vit_l": boom, "vit_b": boom})
    with pytest.raises(CheckpointError) as err:
        LoraSamTeacher(**_kw(base_ckpt, lora, variant="vit_l"))
    msg = str(err.value)
    assert f"checkpoint {base_ckpt} is a SAM vit_b image encoder but teacher.variant is vit_l" in msg, msg
    assert "set teacher.variant=vit_b" in msg and str(lora) not in msg


def test_missing_or_absent_lora_file(tmp_path):
    with pytest.raises(ConfigError, match="needs teacher.lora_checkpoint=.*'sam' teacher"):
        LoraSamTeacher()
    with pytest.raises(CheckpointError, match="LoRA checkpoint not found: .*nope.pt.*teacher.lora_checkpoint"):
        LoraSamTeacher(lora_checkpoint=str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("kwargs, hint", [({"lora_rank": 0}, "lora_rank must be a positive integer"),
                                          ({"lora_alpha": -1.0}, "lora_alpha must be a positive number"),
                                          ({"variant": "vit_bb"}, "Did you mean 'vit_b'")])
def test_bad_lora_config_values(kwargs, hint, tmp_path):
    with pytest.raises(ConfigError, match=hint):
        LoraSamTeacher(lora_checkpoint=str(tmp_path / "x.pt"), **kwargs)


def test_random_init_without_lora_and_the_shipped_config(caplog):
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        teacher = LoraSamTeacher(init="random", input_size=128)
    assert "RANDOMLY INITIALISED" in caplog.text and "the LoRA is empty" in caplog.text
    fp = teacher.fingerprint()
    assert fp.weights == "random-init:seed0+no-lora" and fp.variant == "vit_b+lora_r8_a8"
    assert LoraSamTeacher.config_fingerprint(init="random", input_size=128) == fp
    # configs/teachers/*.yaml name only constructor arguments
    for name in ("lora_sam", "sam2"):
        entry = read_yaml(REPO / "configs" / "teachers" / f"{name}.yaml")
        TEACHERS.check_kwargs(entry["type"], teacher_kwargs(entry), where=name)
