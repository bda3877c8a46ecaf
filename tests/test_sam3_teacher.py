"""The SAM 3 teacher on a checkpoint in the official facebook/sam3 layout, written from transformers' own randomly
initialised ``Sam3VideoModel`` at the ``tiny`` size: features and box-prompted masks equal transformers' own
modules, ``variant: auto``, one clear message per wrong file, and a cache + training run from it."""
from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coco_fixture_sets import coco_image
from PIL import Image
from safetensors.torch import save_file

from vfmkd.core.errors import CheckpointError
from vfmkd.teachers import Sam3Teacher
from vfmkd.teachers.sam3_teacher import SAM3_VARIANTS

SIZE = 56


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(folder, transformers' model): config.json + model.safetensors as facebook/sam3 ships them (the
    model's own state_dict keys: ``detector_model.*``, ``tracker_model.*``, ``tracker_neck.*``)."""
    from transformers import Sam3VideoModel

    logging.getLogger("vfmkd").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("facebook_sam3")
    torch.manual_seed(0)
    model = Sam3VideoModel(SAM3_VARIANTS["tiny"].video_config(SIZE)).eval()
    model.config.save_pretrained(folder)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return folder, model


@pytest.fixture(scope="module")
def teacher(official):
    return Sam3Teacher(checkpoint=str(official[0]), input_size=SIZE)


def test_official_folder_loads_with_variant_auto_and_matches_transformers(official, teacher):
    folder, model = official
    assert teacher.variant == "tiny" and "read from" in teacher.settings.variant_source
    assert teacher.fingerprint() == Sam3Teacher.config_fingerprint(checkpoint=str(folder / "model.safetensors"),
                                                                  input_size=SIZE)
    img = np.array(Image.open(coco_image(0)).convert("RGB"))
    feats, batch = teacher.extract_features([img])
    # the pixels are transformers' own processor's, the features its own modules' on them
    from transformers import Sam3ImageProcessor

    pixels = Sam3ImageProcessor(size={"height": SIZE, "width": SIZE})(images=[img], return_tensors="pt").pixel_values
    assert torch.equal(batch.pixels, pixels)
    with torch.no_grad():
        vision = model.detector_model.vision_encoder(pixels)
        grid = vision.last_hidden_state.view(1, SIZE // 14, SIZE // 14, -1).permute(0, 3, 1, 2)
        tracker = model.tracker_neck(grid)[0]
    assert torch.allclose(feats["patch_tokens"], grid, atol=1e-5)
    for name, level in (("fpn_s7", 1), ("fpn_s14", 2), ("fpn_s28", 3)):
        assert torch.allclose(feats[name], vision.fpn_hidden_states[level], atol=1e-5), name
    assert torch.allclose(feats["tracker_s14"], tracker[2], atol=1e-5)
    dec = model.tracker_model.mask_decoder
    assert torch.allclose(F.pixel_shuffle(feats["tracker_hires_packed_s7"], 2), dec.conv_s0(tracker[0]), atol=1e-5)


def test_box_masks_are_transformers_tracker_masks(official, teacher):
    """mask_logits = ``Sam3TrackerModel`` (loaded from the same folder by transformers' own key mapping) on a box
    prompt, resampled from its S/3.5 grid to S/4."""
    from transformers import Sam3TrackerModel

    tracker = Sam3TrackerModel.from_pretrained(str(official[0])).eval()
    img = np.array(Image.open(coco_image(1)).convert("RGB"))
    feats, batch = teacher.extract_features([img])
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 0.0, 56.0, 30.0]])
    mine = teacher.mask_logits(feats, boxes, torch.zeros(2, dtype=torch.int64))
    with torch.no_grad():
        ref = tracker(pixel_values=batch.pixels, input_boxes=boxes[None], multimask_output=False).pred_masks
    ref = F.interpolate(ref[0], size=(SIZE // 4, SIZE // 4), mode="bilinear", align_corners=False)[:, 0]
    assert mine.shape == (2, SIZE // 4, SIZE // 4) and mine.abs().max() > 0
    assert torch.allclose(mine, ref.clamp(-32, 32), atol=1e-4)


def test_wrong_files_name_what_they_are(official, tmp_path):
    folder, _ = official
    sam = tmp_path / "sam.safetensors"
    save_file({"image_encoder.neck.0.weight": torch.zeros(2, 2)}, str(sam))
    with pytest.raises(CheckpointError, match="is a SAM checkpoint .*not SAM 3.*facebook/sam3"):
        Sam3Teacher(checkpoint=str(sam), input_size=SIZE)
    meta = tmp_path / "sam3.pt"
    torch.save({"detector.backbone.vision_backbone.trunk.patch_embed.proj.weight": torch.zeros(2, 3, 14, 14)}, meta)
    with pytest.raises(CheckpointError, match="Meta's own sam3.pt .*model.safetensors and config.json"):
        Sam3Teacher(checkpoint=str(meta), input_size=SIZE)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="config.json not found"):
        Sam3Teacher(checkpoint=str(lonely), input_size=SIZE)
    with pytest.raises(CheckpointError, match="teacher.variant is sam3; set teacher.variant=tiny"):
        Sam3Teacher(variant="sam3", checkpoint=str(folder), input_size=SIZE)


@pytest.mark.slow  # an end-to-end run of two tools: scheduled first (tests/conftest.py)
def test_cached_by_prepare_teacher_features_and_trained(official, tmp_path):
    from vfmkd.core.config import load_experiment
    from vfmkd.engine.commands import prepare_features as ptf
    from vfmkd.engine.training.trainer import Trainer

    out = tmp_path / "sam3"
    assert ptf.main(["--teacher", "sam3", "--splits", "train2017", "val2017", "--limit", "2", "--batch-size", "2",
                     "--output", str(out), "--no-progress", "--features", "fpn_s14,fpn_s7",
                     f"teacher.checkpoint={official[0]}", f"teacher.input_size={SIZE}"]) == 0
    with h5py.File(out / "train2017.h5", "r") as f:
        assert f["features/fpn_s14"].shape == (2, 32, 4, 4) and f["features/fpn_s7"].shape == (2, 32, 8, 8)
        assert json.loads(f.attrs["fingerprint"])["variant"] == "tiny" and f["done"][:].all()
    experiment = tmp_path / "sam3_tiny.yaml"
    experiment.write_text(EXPERIMENT.format(checkpoint=official[0], size=SIZE, cache=out))
    cfg = load_experiment(experiment, [f"work_dir={tmp_path}"])
    trainer = Trainer(cfg, progress=False)
    assert all(src.live is None for src in trainer.router.sources.values())  # read from the cache
    logs = trainer.fit()["epochs"][0]["train"]
    assert np.isfinite(logs["loss_feat_distill_sam3"]) and np.isfinite(logs["loss_det"])


EXPERIMENT = """
experiment_name: sam3_tiny
model:
  backbone: {{type: yolov8, variant: n}}
  heads: {{detection: {{type: yolo_head, num_classes: 80}}}}
teachers:
  sam3: {{config: configs/teachers/sam3.yaml, offline: true, checkpoint: {checkpoint}, input_size: {size},
          feature_path: {cache}}}
distillation:
  losses:
    feature_mse: {{weight: 1.0, teacher: sam3}}
    detection: {{weight: 1.0}}
data: {{dataset: coco128, batch_size: 2, num_workers: 0, img_size: 64, limit: 2}}
train: {{epochs: 1, eval_interval: 2}}
"""
