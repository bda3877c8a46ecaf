"""A trained vfmkd run as a teacher (``teachers.<name>.type: vfmkd``): a tiny YOLOv8-n student saved in
the trainer's checkpoint layout, loaded back as a frozen teacher; its features, its raw head outputs,
its identity geometry on the student's canvas, and the errors a user can run into."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfmkd.core.config import experiment_from_dict
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.datasets import DetectionDataset, GeometricAugment, letterbox
from vfmkd.datasets.records import collate_samples
from vfmkd.distillation.online_distiller import OnlineTeacher
from vfmkd.distillation.vfmkd_model_teacher import LIVE_ONLY_MESSAGE, VfmkdTeacher
from vfmkd.engine.builders import build_model
from vfmkd.utils.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SIZE = 128


def run_config(num_classes: int = 80, img_size: int = SIZE, variant: str = "n") -> dict:
    """The resolved experiment config a run saves into its checkpoints."""
    return experiment_from_dict({
        "experiment_name": "teacher_run",
        "model": {"backbone": {"type": "yolov8", "variant": variant}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": num_classes}}},
        "data": {"dataset": "coco128", "root": str(REPO / "datasets/coco128"), "img_size": img_size},
    })


def write_run_checkpoint(path: Path, num_classes: int = 80, img_size: int = SIZE, seed: int = 0):
    """A run's ``checkpoints/best.pt`` as ``Trainer.save`` writes it; returns (model, config)."""
    cfg = run_config(num_classes, img_size)
    torch.manual_seed(seed)
    model = build_model(cfg["model"])
    with torch.no_grad():  # BatchNorm statistics that are not the init ones: eval mode must use them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": model.state_dict(), "distiller": {}, "teacher_stats": {},
                           "optimizer": optimizer.state_dict(), "scheduler": {}, "epoch": 3, "config": cfg,
                           "metrics": {"mAP50-95": 0.1}, "resume": {"epoch": 4, "batch": 0}})
    return model.eval(), cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    logging.getLogger("vfmkd").setLevel(logging.ERROR)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "best.pt"
    model, cfg = write_run_checkpoint(path)
    return path, model, cfg


@pytest.fixture(scope="module")
def teacher(run):
    return TEACHERS.build("vfmkd", where="teachers.yolov8n", checkpoint=str(run[0]))


@pytest.fixture(scope="module")
def batch(coco128):
    """A real augmented coco128 batch at the student's size (shifted, scaled, maybe mirrored views)."""
    aug = GeometricAugment(fliplr=0.5, scale=0.4, translate=0.2)
    ds = DetectionDataset(str(coco128), "train2017", img_size=SIZE, limit=4, augment=aug, seed=3)
    return collate_samples([ds[i] for i in range(4)])


def test_built_from_the_runs_own_config(teacher, run):
    path, model, cfg = run
    assert teacher.input_size == SIZE == cfg["data"]["img_size"]
    assert teacher.variant == "yolov8-n" and teacher.family == "vfmkd"
    assert teacher.provides_head_outputs and teacher.live_only
    assert teacher.head_tasks == {"detection": ("detection", 80)} and teacher.num_classes_of("detection") == 80
    with pytest.raises(KeyError, match="has no head 'seg'; it has detection"):
        teacher.num_classes_of("seg")
    sd, ref = teacher.model.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())


def test_fingerprint_is_the_checkpoint_and_the_canvas(teacher, run):
    path = run[0]
    fp = teacher.fingerprint()
    assert (fp.family, fp.variant, fp.input_size, fp.dtype) == ("vfmkd", "yolov8-n", SIZE, "float32")
    assert fp.weights == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fp.preprocessing.startswith("vfmkd:yolo-letterbox")
    assert VfmkdTeacher.config_fingerprint(checkpoint=str(path)) == fp
    assert VfmkdTeacher.config_fingerprint(checkpoint=str(path), input_size=160).input_size == 160
    assert "live only: set offline: false" in LIVE_ONLY_MESSAGE


def test_features_match_specs_and_the_models_backbone(teacher, run):
    model = run[1]
    specs = teacher.feature_specs()
    assert [(s.name, s.channels, s.stride) for s in specs] == [(s.name, s.channels, s.stride)
                                                              for s in model.backbone.feature_specs()]
    assert teacher.primary_feature == "P5"
    img = np.array(Image.open(sorted((REPO / "datasets/coco128/images/val2017").glob("*.jpg"))[0]).convert("RGB"))
    feats, tb = teacher.extract_features([img, img[:50, :31]])
    for s in specs:
        assert feats[s.name].shape == (2, s.channels, SIZE // s.stride, SIZE // s.stride)
        assert feats[s.name].dtype == torch.float32
    # the numpy path is the run's own letterbox / 255
    canvas, aff = letterbox(img, SIZE)
    assert torch.equal(tb.pixels[0], torch.from_numpy(canvas.transpose(2, 0, 1).copy()).float() / 255.0)
    assert torch.equal(tb.affine[0], torch.tensor(aff, dtype=torch.float32))
    assert torch.equal(tb.valid_hw, torch.full((2, 2), SIZE))
    for h, w in [(45, 128), (128, 45), (37, 53), (5, 128), (1, 3), (480, 640)]:
        assert VfmkdTeacher.input_affine(h, w, SIZE) == letterbox(np.zeros((h, w, 3), np.uint8), SIZE)[1], (h, w)
    with torch.no_grad():
        want = model.backbone(tb.pixels)
    assert all(torch.allclose(feats[k], want[k], atol=1e-5) for k in want)


def test_head_outputs_are_the_models_raw_training_outputs_in_eval_mode(teacher, run, batch):
    model = run[1]
    feats, heads = teacher.forward_with_heads(batch.images)
    with torch.no_grad():
        out = model(batch.images)  # eval: (decoded, raw dict) from ultralytics' Detect
    raw = out.heads["detection"][1]
    got = heads["detection"]
    assert isinstance(got, dict) and {"boxes", "scores", "feats"} <= set(got)
    anchors = sum((SIZE // s) ** 2 for s in (8, 16, 32))
    assert got["scores"].shape == (4, 80, anchors) and got["boxes"].shape == (4, 64, anchors)
    assert torch.allclose(got["scores"], raw["scores"], atol=1e-5) and torch.allclose(
        got["boxes"], raw["boxes"], atol=1e-5
    )
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got["feats"], raw["feats"]))
    assert all(torch.allclose(feats[k], out.backbone[k], atol=1e-5) for k in out.backbone)
    assert not got["scores"].requires_grad
    # the Detect flag is back: the teacher's own eval pass still decodes
    assert not any(m.training for m in teacher.modules())
    assert isinstance(teacher.model(batch.images).heads["detection"], tuple)


def test_live_geometry_on_the_student_canvas_is_the_identity(teacher, batch):
    boxes = batch.views.content_box
    assert (boxes[:, :2] > 0).any(), "the augmented batch should have content boxes off the origin"
    tb = teacher.preprocess_crops(batch.images, boxes)
    assert torch.equal(tb.pixels, batch.images)  # the canvas itself, padding included
    targets = OnlineTeacher("yolov8n", teacher, torch.device("cpu")).targets(batch)
    assert torch.equal(targets.affine, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4))
    assert torch.equal(targets.student_affine, targets.affine)
    assert torch.equal(targets.valid_hw, torch.full((4, 2), float(SIZE)))
    want, heads = teacher.forward_with_heads(batch.images)
    assert all(torch.equal(targets.features[k], want[k]) for k in want)
    # the raw head outputs travel with the targets, on the student's canvas (its anchors)
    assert torch.equal(targets.head_outputs["detection"]["scores"], heads["detection"]["scores"])


def test_a_teacher_at_another_canvas_size_carries_the_scale(run, batch):
    teacher = VfmkdTeacher(checkpoint=str(run[0]), input_size=160)
    targets = OnlineTeacher("t", teacher, torch.device("cpu")).targets(batch)
    assert torch.allclose(targets.affine, torch.tensor([[1.25, 1.25, 0.0, 0.0]] * 4))
    assert targets.features["P5"].shape[-1] == 5
    with pytest.raises(ConfigError, match="teacher.input_size must be a multiple of 32.*got 100; nearest valid: 96 or "
                                          "128"):
        VfmkdTeacher(checkpoint=str(run[0]), input_size=100)


def test_a_dsrl_run_downsizes_its_input_as_at_its_own_evaluation(tmp_path, batch):
    """A run trained with model.resolution_distill sees the canvas / sr_target_scale: as a teacher too."""
    cfg = experiment_from_dict({
        "experiment_name": "dsrl_run",
        "model": {"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 80},
                            "semantic": {"type": "semantic_head", "num_classes": 130, "output_stride": 8}},
                  "resolution_distill": {"enabled": True, "sr_target_scale": 2.0}},
        "data": {"dataset": "coco128", "root": str(REPO / "datasets/coco128"), "img_size": SIZE},
    })
    torch.manual_seed(0)
    model = build_model(cfg["model"]).eval()
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg})
    teacher = VfmkdTeacher(checkpoint=str(path))
    assert teacher.model.input_scale == 2.0
    assert {s.name: s.stride for s in teacher.feature_specs()} == {"P3": 16, "P4": 32, "P5": 64}  # canvas pixels
    feats, heads = teacher.forward_with_heads(batch.images)
    assert feats["P5"].shape[-2:] == (SIZE // 64, SIZE // 64)
    assert all(torch.equal(feats[k], v) for k, v in teacher.forward_features(batch.images).items())
    with torch.no_grad():
        want = model(batch.images)  # the run's own evaluation pass: same downsized input
    assert torch.allclose(heads["semantic"], want.heads["semantic"], atol=1e-5)
    assert torch.allclose(feats["P3"], want.backbone["P3"], atol=1e-5)
    with pytest.raises(ConfigError, match="teacher.input_size 160 / sr_target_scale 2 = 80 is not a multiple"):
        VfmkdTeacher(checkpoint=str(path), input_size=160)


def test_student_classes_are_checked(teacher):
    same = build_model(run_config(80)["model"]).heads
    assert teacher.check_compatible(same) == {"detection": "detection"}
    other = build_model(run_config(3)["model"]).heads
    with pytest.raises(ConfigError, match=r"head 'detection' \(detection\) predicts 80 classes but the student's "
                                          r"head 'detection' predicts 3.*num_classes=80"):
        teacher.check_compatible(other)
    renamed = {"det": other["detection"]}  # paired by task when the names differ
    with pytest.raises(ConfigError, match="predicts 80 classes.*predicts 3"):
        teacher.check_compatible(renamed)


def test_bad_checkpoints_are_refused(run, tmp_path):
    path, model, cfg = run
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": model.state_dict(), "config": cfg, "extra": Path("x")}, pickled)  # a pickled object
    with pytest.raises(CheckpointError, match="refused: it contains pickled Python objects"):
        VfmkdTeacher(checkpoint=str(pickled))
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="is not a vfmkd training checkpoint"):
        VfmkdTeacher(checkpoint=str(plain))
    with pytest.raises(CheckpointError, match="vfmkd teacher checkpoint not found"):
        VfmkdTeacher.config_fingerprint(checkpoint=str(tmp_path / "gone.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": build_model(run_config(3)["model"]).state_dict(), "config": cfg}, wrong)
    with pytest.raises(CheckpointError, match="do not fit the model its own config describes"):
        VfmkdTeacher(checkpoint=str(wrong))


def test_config_errors(run):
    path = str(run[0])
    with pytest.raises(ConfigError, match="teacher.variant='yolov8-s' is not valid: .* holds a yolov8-n student"):
        VfmkdTeacher(checkpoint=path, variant="yolov8-s")
    assert VfmkdTeacher.config_fingerprint(checkpoint=path, variant="yolov8-n").variant == "yolov8-n"
    with pytest.raises(ConfigError, match="needs the key\\(s\\): checkpoint"):
        TEACHERS.build("vfmkd", where="teachers.t")
    with pytest.raises(ConfigError, match="unknown key 'teacher.init'"):
        VfmkdTeacher.config_fingerprint(checkpoint=path, init="random")


def test_live_only_refused_by_the_cache_tool_and_as_an_offline_teacher(run, tmp_path):
    run = run[0]
    import subprocess
    import sys

    from vfmkd.engine.builders import open_cache

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_teacher_features.py"), "--teacher", "vfmkd",
                           "--output", str(tmp_path), f"teacher.checkpoint={run}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "live only" in proc.stderr + proc.stdout
    with pytest.raises(ConfigError, match="offline=false"):
        open_cache("yolov8s", {"type": "vfmkd", "checkpoint": str(run), "feature_path": str(tmp_path)}, "coco128",
                   "val2017")
