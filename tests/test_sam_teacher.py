"""SamTeacher against the real segment-anything library, on real coco128 images."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything import SamPredictor, sam_model_registry

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.sam_teacher import SamTeacher
from vfmkd.utils.checkpoint import sha256_of_file

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted((REPO / "datasets/coco128/images/val2017").glob("*.jpg"))
DOWNLOAD_CMD = "python tools/download_weights.py --model sam_vit_b"


def _rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session")
def images():
    if len(IMAGES) < 2:
        pytest.skip("coco128 val2017 images are not in datasets/coco128")
    return [_rgb(IMAGES[0]), _rgb(IMAGES[1])]


@pytest.fixture(scope="session")
def sam_vit_b(tmp_path_factory):
    """segment-anything's own random vit_b, saved in the official checkpoint layout (~360 MB, once)."""
    torch.manual_seed(0)
    model = sam_model_registry["vit_b"]()
    with torch.no_grad():  # both are zero-initialised: make them non-zero so the tests see them
        model.image_encoder.pos_embed.normal_(std=0.02)
        for name, p in model.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(std=0.02)
    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_01ec64.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_preprocessing_and_grid_at_1024_are_sams_own(sam_vit_b, images):
    """The official size on the CPU without an encoder pass (two ViT-B passes at 1024 cost a minute): SAM's
    own resize / normalise / pad, the checkpoint's 64 x 64 position grid used as is. The encoder's numbers
    are checked against segment-anything at 256 below (same code) and at 1024 under ``pytest -m gpu``."""
    path, model = sam_vit_b
    teacher = SamTeacher(checkpoint=str(path))
    img = images[0]
    batch = teacher.preprocess([img])
    predictor = SamPredictor(model)
    resized = torch.as_tensor(predictor.transform.apply_image(img)).permute(2, 0, 1)[None]
    torch.testing.assert_close(batch.pixels, model.preprocess(resized), atol=0, rtol=0)
    torch.testing.assert_close(teacher.sam.image_encoder.pos_embed, model.image_encoder.pos_embed, atol=0, rtol=0)
    assert teacher.sam.prompt_encoder.image_embedding_size == (64, 64)
    assert teacher.fingerprint().weights == sha256_of_file(path)


@pytest.mark.gpu  # a minute of CPU; the GPU suite's `pytest -m gpu` step runs it (on the CPU tensors as here)
def test_features_identical_to_segment_anything_at_1024(sam_vit_b, images):
    path, model = sam_vit_b
    teacher = SamTeacher(checkpoint=str(path), backend="stock")  # to 1e-5; fast: tests/test_teacher_backend.py
    img = images[0]
    feats, batch = teacher.extract_features([img])

    trunk = {}
    hook = model.image_encoder.blocks[-1].register_forward_hook(lambda m, i, o: trunk.setdefault("x", o))
    predictor = SamPredictor(model)
    predictor.set_image(img)
    hook.remove()
    ref = predictor.get_image_embedding()

    assert feats["image_embeddings"].shape == ref.shape == (1, 256, 64, 64)
    torch.testing.assert_close(feats["image_embeddings"], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats["trunk"], trunk["x"].permute(0, 3, 1, 2), atol=1e-5, rtol=0)
    # and the preprocessing is SAM's own: resize longest side, normalise, pad bottom-right
    resized = torch.as_tensor(predictor.transform.apply_image(img)).permute(2, 0, 1)[None]
    torch.testing.assert_close(batch.pixels, model.preprocess(resized), atol=0, rtol=0)
    assert teacher.fingerprint().weights == sha256_of_file(path)


def test_small_input_size_geometry_and_masks(sam_vit_b, images, tmp_path, monkeypatch, caplog):
    path, model = sam_vit_b
    (tmp_path / "weights").mkdir()
    os.symlink(path, tmp_path / "weights" / path.name)
    monkeypatch.chdir(tmp_path)  # checkpoint=None resolves to weights/sam_vit_b_01ec64.pth
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        teacher = TEACHERS.build("sam", variant="vit_b", input_size=256)
    assert "Using SAM teacher model: vit_b" in caplog.text
    assert "Loaded SAM checkpoint from: weights/sam_vit_b_01ec64.pth" in caplog.text

    # pos_embed re-sized bicubically from the checkpoint's 64x64 grid; SAM's sizes follow
    enc = teacher.sam.image_encoder
    expected = F.interpolate(model.image_encoder.pos_embed.detach().permute(0, 3, 1, 2), size=(16, 16),
                             mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert enc.pos_embed.shape == (1, 16, 16, 768)
    torch.testing.assert_close(enc.pos_embed, expected)
    assert enc.img_size == 256 and teacher.sam.prompt_encoder.image_embedding_size == (16, 16)
    # Offline runs check caches against the fingerprint computed from config alone.
    assert type(teacher).config_fingerprint(variant="vit_b", input_size=256) == teacher.fingerprint()

    img = images[0]  # 426 x 640 (H x W), landscape
    assert img.shape[:2] == (426, 640)
    feats, batch = teacher.extract_features(images)
    for spec in teacher.feature_specs():
        assert feats[spec.name].shape == (2, spec.channels, 256 // spec.stride, 256 // spec.stride)
        assert feats[spec.name].dtype == torch.float32
    assert [s.name for s in teacher.feature_specs()] == ["trunk", "image_embeddings"]
    assert teacher.primary_feature == "image_embeddings"
    # 640 -> 256 is a 0.4 scale; 426 * 0.4 = 170.4 -> 170 rows
    assert batch.valid_hw[0].tolist() == [170, 256]
    torch.testing.assert_close(batch.affine[0], torch.tensor([0.4, 170 / 426, 0.0, 0.0]))
    assert batch.pixels.shape == (2, 3, 256, 256)
    assert batch.pixels[0, :, 170:].abs().max() == 0 and batch.pixels[0, :, :170].abs().max() > 0

    # SAM's own predictor on this teacher's model agrees with forward_features at 256
    predictor = SamPredictor(teacher.sam)
    predictor.set_image(img)
    torch.testing.assert_close(feats["image_embeddings"][:1], predictor.get_image_embedding(), atol=1e-5, rtol=0)

    masks, scores, logits = teacher.predict_masks(img, boxes=np.array([100, 80, 400, 300]))
    assert masks.shape == (3, 426, 640) and masks.dtype == bool
    assert scores.shape == (3,) and logits.shape == (3, 64, 64)
    masks, scores, _ = teacher.predict_masks(
        img, boxes=np.array([[100, 80, 400, 300], [0, 0, 50, 50]]), points=[[200, 150]], multimask_output=False
    )
    assert masks.shape == (2, 426, 640) and scores.shape == (2,)

    fp = teacher.fingerprint()
    assert (fp.family, fp.variant, fp.input_size, fp.dtype) == ("sam", "vit_b", 256, "float32")
    assert fp.weights == sha256_of_file(path) and fp.preprocessing.startswith("sam:resize-longest-side")


def test_missing_checkpoint_names_the_download_command(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError) as err:
        SamTeacher(checkpoint=str(tmp_path / "nope.pth"))
    assert DOWNLOAD_CMD in str(err.value) and "teacher.init=random" in str(err.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"weights/sam_vit_l_0b3195\.pth") as err:
        SamTeacher(variant="vit_l")
    assert "python tools/download_weights.py --model sam_vit_l" in str(err.value)


def test_checkpoint_of_another_variant_is_detected_before_loading(tmp_path, monkeypatch):
    # Real vit_l keys and shapes (built on the meta device); stride-0 tensors keep the file tiny.
    with torch.device("meta"):
        vit_l = sam_model_registry["vit_l"]()
    sd = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in vit_l.state_dict().items()}
    path = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save(sd, path)

    def boom(*args, **kwargs):
        raise AssertionError("load_state_dict must not be reached")

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", boom)
    with pytest.raises(CheckpointError) as err:
        SamTeacher(variant="vit_b", checkpoint=str(path))
    msg = str(err.value)
    assert "is a SAM vit_l image encoder but teacher.variant is vit_b" in msg
    assert "teacher.variant=vit_l" in msg


def test_non_sam_state_dict_is_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="not a SAM"):
        SamTeacher(checkpoint=str(path))


def test_truncated_checkpoint(sam_vit_b, tmp_path):
    path, _ = sam_vit_b
    cut = tmp_path / "sam_vit_b_01ec64.pth"
    with open(path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(path.stat().st_size // 2))
    with pytest.raises(CheckpointError) as err:
        SamTeacher(checkpoint=str(cut))
    msg = str(err.value)
    assert "truncated or corrupt" in msg and str(cut.stat().st_size) in msg
    assert "re-download" in msg and DOWNLOAD_CMD in msg


class Payload:
    """Stands for any pickled Python object inside a checkpoint."""

    def __init__(self):
        self.x = 1

    def __setstate__(self, state):  # would run if the file were unpickled unsafely
        UNPICKLED.append(state)


UNPICKLED: list = []


def test_checkpoint_with_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        SamTeacher(checkpoint=str(path))
    msg = str(err.value)
    assert "refused" in msg and "pickled Python objects" in msg and "Payload" in msg
    assert "never loads such files unsafely" in msg and "state_dict" in msg
    assert UNPICKLED == []


def test_random_init_is_loud_and_fingerprinted(caplog):
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        teacher = SamTeacher(init="random", input_size=256)
    banner = [r for r in caplog.records if r.levelno == logging.WARNING and "RANDOMLY INITIALISED" in r.getMessage()]
    assert banner and "MEANINGLESS" in banner[0].getMessage() and banner[0].getMessage().count("\n") >= 4
    assert teacher.fingerprint().weights == "random-init:seed0"
    assert SamTeacher.config_fingerprint(init="random", input_size=256) == teacher.fingerprint()


@pytest.mark.parametrize(
    "kwargs, hint",
    [
        ({"variant": "vit_bb"}, "Did you mean 'vit_b'"),
        ({"variant": "sam_vit_l"}, "Did you mean 'vit_l'"),
        ({"input_size": 500}, r"multiple of 16 \(SAM's patch size\), got 500; nearest valid: 496 or 512"),
    ],
)
def test_bad_config_values(kwargs, hint):
    with pytest.raises(ConfigError, match=hint):
        SamTeacher(**kwargs)
