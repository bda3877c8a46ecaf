"""Sam2Teacher against Meta's real sam2 package, on real coco128 images."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.official_weights import OFFICIAL_WEIGHTS, weights_for
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.sam2_teacher import SAM2_MEAN, SAM2_STD, SAM2_VARIANTS, Sam2Teacher
from vfmkd.utils.checkpoint import sha256_of_file

sam2 = pytest.importorskip("sam2", reason="Meta's sam2 package is installed by scripts/setup.sh")
from sam2.build_sam import build_sam2  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402
from sam2.utils.transforms import SAM2Transforms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted((REPO / "datasets/coco128/images/val2017").glob("*.jpg"))
TINY = "sam2.1_hiera_tiny"
DOWNLOAD_CMD = f"python tools/download_weights.py --model {TINY}"


def _rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session")
def images():
    if len(IMAGES) < 2:
        pytest.skip("coco128 val2017 images are not in datasets/coco128")
    return [_rgb(IMAGES[0]), _rgb(IMAGES[1])]


@pytest.fixture(scope="session")
def sam2_tiny(tmp_path_factory):
    """The sam2 package's own random SAM2.1 hiera_tiny, saved in the official layout {"model": sd}."""
    torch.manual_seed(0)
    model = build_sam2(SAM2_VARIANTS[TINY][0], ckpt_path=None, device="cpu")
    with torch.no_grad():  # both are zero-initialised: make them non-zero so the tests see them
        model.image_encoder.trunk.pos_embed.normal_(std=0.02)
        model.image_encoder.trunk.pos_embed_window.normal_(std=0.02)
    path = tmp_path_factory.mktemp("weights") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model


def _meta_checkpoint(variant: str, path: Path, monkeypatch) -> Path:
    """A checkpoint with the real keys and shapes of ``variant`` (built on the meta device; stride-0
    tensors keep the file tiny)."""
    linspace = torch.linspace  # Hiera reads its drop-path schedule with .item(): keep that one on the CPU
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{"device": "cpu", **k}))
    with torch.device("meta"):
        model = build_sam2(SAM2_VARIANTS[variant][0], ckpt_path=None, device="meta")
    monkeypatch.undo()
    sd = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}
    torch.save({"model": sd}, path)
    return path


def test_preprocessing_at_1024_is_sam2s(sam2_tiny, images):
    path, _ = sam2_tiny
    teacher = Sam2Teacher(checkpoint=str(path))  # official layout, loaded with weights_only=True
    img = images[0]  # 426 x 640
    batch = teacher.preprocess([img])
    # the preprocessing is SAM2's own: a square resize that ignores the aspect ratio
    pixels = SAM2Transforms(1024, mask_threshold=0.0)(img)[None]
    torch.testing.assert_close(batch.pixels, pixels, atol=0, rtol=0)
    torch.testing.assert_close(batch.affine, torch.tensor([[1024 / 640, 1024 / 426, 0.0, 0.0]]))
    assert batch.valid_hw.tolist() == [[1024, 1024]]
    assert teacher.fingerprint().weights == sha256_of_file(path)


@pytest.mark.gpu  # two Hiera passes at 1024 (~10 s of CPU): the GPU suite's `pytest -m gpu` step runs it; the
# numerics are checked against the library at 256 in the next test (same code)
def test_features_identical_to_sam2_at_1024(sam2_tiny, images):
    path, model = sam2_tiny
    teacher = Sam2Teacher(checkpoint=str(path))
    img = images[0]
    feats, batch = teacher.extract_features([img])
    for spec in teacher.feature_specs():
        assert feats[spec.name].shape == (1, spec.channels, 1024 // spec.stride, 1024 // spec.stride)

    # what SAM2's image predictor hands its mask decoder (forward_image: the hires projections)
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(img)
    torch.testing.assert_close(predictor._features["image_embed"],
                               feats["fpn_s16"] + model.no_mem_embed.view(1, -1, 1, 1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(predictor._features["high_res_feats"][0], feats["hires_s4"], atol=1e-5, rtol=0)
    torch.testing.assert_close(predictor._features["high_res_feats"][1], feats["hires_s8"], atol=1e-5, rtol=0)
    assert teacher.fingerprint().weights == sha256_of_file(path)


def test_small_input_size_geometry_masks_and_fingerprint(sam2_tiny, images, tmp_path, monkeypatch, caplog):
    path, model = sam2_tiny
    (tmp_path / "weights").mkdir()
    os.symlink(path, tmp_path / "weights" / path.name)
    monkeypatch.chdir(tmp_path)  # checkpoint=None resolves to weights/sam2.1_hiera_tiny.pt
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        teacher = TEACHERS.build("sam2", input_size=256)
    assert "Loaded SAM2 checkpoint from: weights/sam2.1_hiera_tiny.pt" in caplog.text
    assert type(teacher).config_fingerprint(input_size=256) == teacher.fingerprint()
    assert teacher.sam2.image_size == 256 and teacher.sam2.sam_prompt_encoder.image_embedding_size == (16, 16)

    feats, batch = teacher.extract_features(images)
    assert [s.name for s in teacher.feature_specs()] == ["fpn_s4", "fpn_s8", "fpn_s16", "hires_s4", "hires_s8"]
    assert teacher.primary_feature == "fpn_s16"
    for spec in teacher.feature_specs():
        assert feats[spec.name].shape == (2, spec.channels, 256 // spec.stride, 256 // spec.stride)
        assert feats[spec.name].dtype == torch.float32
    h1, w1 = images[1].shape[:2]
    torch.testing.assert_close(batch.affine, torch.tensor([[0.4, 256 / 426, 0, 0], [256 / w1, 256 / h1, 0, 0]]))
    assert batch.valid_hw.tolist() == [[256, 256], [256, 256]]

    # the library's image encoder on the same pixels: the raw FPN levels, and forward_image's projections
    with torch.no_grad():
        ref = model.image_encoder(batch.pixels[:1])
        projected = model.forward_image(batch.pixels[:1])["backbone_fpn"]  # overwrites levels 0/1 with conv_s0/s1
    for name, want in zip(("fpn_s4", "fpn_s8", "fpn_s16"), ref["backbone_fpn"]):
        torch.testing.assert_close(feats[name][:1], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats["fpn_s16"][:1], ref["vision_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats["hires_s4"][:1], projected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats["hires_s8"][:1], projected[1], atol=1e-5, rtol=0)

    img = images[0]
    masks, scores, logits = teacher.predict_masks(img, boxes=np.array([100, 80, 400, 300]))
    assert masks.shape == (3, 426, 640) and masks.dtype == bool
    assert scores.shape == (3,) and logits.shape == (3, 64, 64)
    # predict_masks went through SAM2ImagePredictor, resized to 256 (its feature sizes follow input_size)
    high_res = teacher._predictor._features["high_res_feats"]
    torch.testing.assert_close(high_res[1], feats["hires_s8"][:1], atol=1e-5, rtol=0)
    assert isinstance(teacher._predictor, SAM2ImagePredictor) and teacher._predictor._transforms.resolution == 256
    masks, scores, _ = teacher.predict_masks(
        img, boxes=np.array([[100, 80, 400, 300], [0, 0, 50, 50]]), points=[[200, 150]], multimask_output=False
    )
    assert masks.shape == (2, 426, 640) and scores.shape == (2,)

    fp = teacher.fingerprint()
    assert (fp.family, fp.variant, fp.input_size, fp.dtype) == ("sam2", TINY, 256, "float32")
    assert fp.weights == sha256_of_file(path) and fp.preprocessing.startswith("sam2:resize-square-no-aspect")
    transforms = SAM2Transforms(256, mask_threshold=0.0)  # the constants of the fingerprint are SAM2's
    assert transforms.mean == list(SAM2_MEAN) and transforms.std == list(SAM2_STD)


def test_checkpoint_of_another_size_or_version_is_detected_before_loading(tmp_path, monkeypatch):
    large = _meta_checkpoint("sam2.1_hiera_large", tmp_path / "sam2.1_hiera_large.pt", monkeypatch)
    v20 = _meta_checkpoint("sam2_hiera_tiny", tmp_path / "sam2_hiera_tiny.pt", monkeypatch)

    def boom(*args, **kwargs):
        raise AssertionError("no model may be built for a mismatched checkpoint")

    monkeypatch.setattr("vfmkd.teachers.sam2_teacher.build_sam2_model", boom)
    with pytest.raises(CheckpointError) as err:
        Sam2Teacher(variant=TINY, checkpoint=str(large))
    msg = str(err.value)
    assert "is a SAM2.1 Hiera-large (embed dim 144, 48 blocks) model but teacher.variant is sam2.1_hiera_tiny" in msg
    assert "set teacher.variant=sam2.1_hiera_large" in msg
    with pytest.raises(CheckpointError, match=r"is a SAM2 Hiera-tiny .* set teacher.variant=sam2_hiera_tiny"):
        Sam2Teacher(variant=TINY, checkpoint=str(v20))

    sam1 = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, sam1)
    with pytest.raises(CheckpointError, match="segment-anything v1.*'sam' teacher"):
        Sam2Teacher(checkpoint=str(sam1))


def test_missing_checkpoint_names_the_download_command(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError) as err:
        Sam2Teacher(checkpoint=str(tmp_path / "nope.pt"))
    assert DOWNLOAD_CMD in str(err.value) and "teacher.init=random" in str(err.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"weights/sam2\.1_hiera_large\.pt"):
        Sam2Teacher(variant="sam2.1_hiera_large")


def test_random_init_is_loud_and_fingerprinted(caplog):
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        teacher = Sam2Teacher(init="random", input_size=128, seed=3)
    banner = [r for r in caplog.records if r.levelno == logging.WARNING and "RANDOMLY INITIALISED" in r.getMessage()]
    assert banner and "MEANINGLESS" in banner[0].getMessage() and DOWNLOAD_CMD in banner[0].getMessage()
    assert teacher.fingerprint().weights == "random-init:seed3"
    assert Sam2Teacher.config_fingerprint(init="random", input_size=128, seed=3) == teacher.fingerprint()
    again = Sam2Teacher(init="random", input_size=128, seed=3)  # the seed alone decides the weights
    torch.testing.assert_close(again.sam2.image_encoder.neck.convs[0].conv.weight,
                               teacher.sam2.image_encoder.neck.convs[0].conv.weight, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, hint",
    [
        ({"variant": "sam2.1_hiera_tiniy"}, "Did you mean 'sam2.1_hiera_tiny'"),
        ({"input_size": 240}, r"multiple of 32 \(SAM2's Hiera encoder.*\), got 240; nearest valid: 224 or 256"),
        ({"input_size": 20}, "multiple of 32 .*nearest valid: 32"),
    ],
)
def test_bad_config_values(kwargs, hint):
    with pytest.raises(ConfigError, match=hint):
        Sam2Teacher(**kwargs)


def test_official_weights_entries():
    for variant in SAM2_VARIANTS:
        w = weights_for("sam2", variant)
        assert w.name == variant and w.filename == SAM2_VARIANTS[variant][1]
        release = "092824" if variant.startswith("sam2.1") else "072824"
        assert w.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/{release}/{w.filename}"
        assert w.sha256 is None or (len(w.sha256) == 64 and int(w.sha256, 16) >= 0)
    assert OFFICIAL_WEIGHTS[TINY].size_bytes == 156_008_466


def test_cache_tool_writes_sam2_features(tmp_path, monkeypatch):
    from vfmkd.cache import FeatureCacheReader
    from vfmkd.engine.builders import open_cache
    from vfmkd.engine.commands import prepare_features as ptf

    out = tmp_path / "sam2"
    args = ["--teacher", "sam2", "--dataset", "coco128", "--splits", "val2017", "--limit", "2", "--batch-size", "2",
            "--output", str(out), "--no-progress", "--features", "fpn_s16,hires_s8", "--verify", "1",
            "teacher.init=random", "teacher.input_size=256"]
    assert ptf.main(args) == 0  # --verify 1: a live pass of the same teacher agrees with the cache (cosine >= 0.999)
    reader = FeatureCacheReader(out / "val2017.h5")
    assert [(s.name, s.channels, s.stride) for s in reader.feature_specs] == [("fpn_s16", 256, 16), ("hires_s8", 64, 8)]
    assert reader.fingerprint == Sam2Teacher.config_fingerprint(init="random", input_size=256)
    cached = reader.read(IMAGES[1].stem)
    assert cached["features"]["fpn_s16"].shape == (256, 16, 16) and cached["features"]["hires_s8"].shape == (64, 32, 32)
    h, w = _rgb(IMAGES[1]).shape[:2]
    torch.testing.assert_close(cached["affine"], torch.tensor([256 / w, 256 / h, 0.0, 0.0]))
    assert cached["valid_hw"].tolist() == [256, 256]
    reader.close()
    # training accepts the cache for the same config (fingerprint from the config alone)
    entry = {"type": "sam2", "init": "random", "input_size": 256, "feature_path": str(out)}
    assert open_cache("sam2", entry, "coco128", "val2017").primary_feature == "fpn_s16"


def test_builds_under_another_apps_hydra_and_leaves_it_alone(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()  # the instance `import sam2` created
    try:
        GlobalHydra.instance().clear()
        (tmp_path / "app.yaml").write_text("x: 1\n")
        with initialize_config_dir(str(tmp_path), version_base="1.2"):  # e.g. a user's @hydra.main app
            sources = lambda: [s.path for s in GlobalHydra.instance().config_loader().get_sources()]  # noqa: E731
            theirs = sources()
            Sam2Teacher(init="random", input_size=64)
            assert sources() == theirs and compose("app").x == 1  # their Hydra is as it was
        GlobalHydra.instance().clear()  # and with no global Hydra at all
        Sam2Teacher(init="random", input_size=64)
        assert not GlobalHydra.instance().is_initialized()
    finally:
        restore_gh_from_backup(backup)


def test_vfmkd_never_starts_hydra_itself():
    """Importing vfmkd's teachers does not import sam2/Hydra; vfmkd's OmegaConf configs read the same
    after sam2 has set up its global Hydra and resolvers."""
    code = (
        "import sys\n"
        "import vfmkd.teachers\n"
        "from vfmkd.core.config import load_experiment\n"
        "assert 'sam2' not in sys.modules and 'hydra' not in sys.modules, 'imported eagerly'\n"
        "before = load_experiment('configs/experiments/yolov8_sam_coco128.yaml', ['teachers.sam.init=random'])\n"
        "import sam2\n"
        "from hydra.core.global_hydra import GlobalHydra\n"
        "assert GlobalHydra.instance().is_initialized()\n"
        "after = load_experiment('configs/experiments/yolov8_sam_coco128.yaml', ['teachers.sam.init=random'])\n"
        "assert before == after\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
