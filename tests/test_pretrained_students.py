"""model.init: students start from an ultralytics YOLOv8 file, a timm checkpoint or an earlier vfmkd run.
Files are written by the libraries' own save paths from randomly initialised models (no downloads)."""
from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path

import pytest
import timm
import torch
import yaml

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.engine.builders import build_model
from vfmkd.engine.training.trainer import Trainer
from vfmkd.utils.checkpoint import load_checkpoint
from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import train as train_tool  # noqa: E402


def yolo_cfg(head: str = "yolo_head", classes: int = 80, **init) -> dict:
    return {"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
            "heads": {"detection": {"type": head, "num_classes": classes}}, "init": init}


def write_ultralytics(path: Path, yaml_name: str) -> Path:
    """A released-format ultralytics checkpoint: the trainer's dict (EMA model, fp16) finalised by
    ultralytics' own strip_optimizer, as yolov8n.pt / yolov8n-seg.pt are published."""
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.torch_utils import strip_optimizer

    torch.manual_seed(0)
    kind = SegmentationModel if "seg" in yaml_name else DetectionModel
    model = kind(yaml_name, nc=80, verbose=False)
    for m in model.modules():  # non-trivial BatchNorm statistics, so a missed buffer shows in the outputs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.args = dict(DEFAULT_CFG_DICT)
    torch.save({"epoch": 0, "best_fitness": None, "model": None, "ema": deepcopy(model).half(), "updates": 1,
                "optimizer": None, "train_args": dict(DEFAULT_CFG_DICT)}, path)
    strip_optimizer(path)
    return path


@pytest.fixture(scope="module")
def yolov8n_file(tmp_path_factory) -> Path:
    return write_ultralytics(tmp_path_factory.mktemp("ul") / "yolov8n.pt", "yolov8n.yaml")


def test_yolov8_from_ultralytics_file_matches_ultralytics(yolov8n_file):
    from ultralytics import YOLO

    student = build_model(yolo_cfg(**{"from": str(yolov8n_file)}), initialise=True).eval()
    report = student.init_report
    assert report.loaded and not (report.skipped or report.mismatched or report.missing)
    reference = YOLO(str(yolov8n_file)).model.float().eval()
    image = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        ours, theirs = student(image).heads["detection"][0], reference(image)[0]
    assert ours.shape == theirs.shape == (2, 84, 12 * 16 + 6 * 8 + 3 * 4)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_yolov8_seg_file_and_class_count_mismatch(tmp_path, yolov8n_file):
    seg_file = write_ultralytics(tmp_path / "yolov8n-seg.pt", "yolov8n-seg.yaml")
    cfg = yolo_cfg("yolo_seg_head", **{"from": str(seg_file)})
    assert "num_protos=64" in build_model(cfg, initialise=True).init_report.summary()  # yolov8n-seg: 256 x width 0.25
    cfg["heads"]["detection"]["num_protos"] = 64
    seg = build_model(cfg, initialise=True).eval()
    assert not (seg.init_report.skipped or seg.init_report.mismatched or seg.init_report.missing)
    from ultralytics import YOLO

    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = seg(image).heads["detection"], YOLO(str(seg_file)).model.float().eval()(image)
    assert torch.allclose(ours[0][0], theirs[0][0], atol=1e-4, rtol=0)  # boxes, classes, mask coefficients
    assert torch.allclose(ours[0][1], theirs[0][1], atol=1e-4, rtol=0)  # prototypes
    # 3 classes from an 80-class file: trunk, neck and box branch load, the class branch is reported.
    few = build_model(yolo_cfg(classes=3, **{"from": str(yolov8n_file)}), initialise=True)
    report = few.init_report
    assert report.mismatched and all(".cv3." in n for n, _, _ in report.mismatched)
    assert any(n.startswith("heads.detection.detect.cv2.") for n in report.loaded)
    assert "shape-mismatched" in report.summary() and "3 classes, the file 80" in report.summary()
    with pytest.raises(ConfigError, match="strict: true.*shape-mismatched.*cv3"):
        build_model(yolo_cfg(classes=3, strict=True, **{"from": str(yolov8n_file)}), initialise=True)
    trunk = build_model(yolo_cfg(classes=3, strict=True, parts=["backbone", "neck"], **{"from": str(yolov8n_file)}),
                        initialise=True)
    assert {n.split(".")[0] for n in trunk.init_report.loaded} == {"backbone", "neck"}


def vit_cfg(**init) -> dict:
    return {
        "backbone": {"type": "vit", "variant": "tiny", "img_size": 64, "out_channels": 32},
        "neck": {"type": "yolov8_pafpn"},
        "heads": {"detection": {"type": "yolo_head", "num_classes": 3}},
        "init": init,
    }


def test_timm_files_load_as_timm_loads_them(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), tmp_path / "vit.safetensors")
    student = build_model(vit_cfg(**{"from": str(tmp_path / "vit.safetensors")}), initialise=True)
    report = student.init_report
    assert report.dropped == ["head.weight", "head.bias"] or sorted(report.dropped) == ["head.bias", "head.weight"]
    assert not (report.skipped or report.mismatched or report.missing)
    # timm's own pretrained loading at the student's 64 px grid (position embedding 14x14 -> 4x4).
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=True, img_size=64, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "vit.safetensors")))
    ours = student.backbone.vit.state_dict()
    assert ours["pos_embed"].shape == ref.pos_embed.shape == (1, 17, 192)
    assert all(torch.equal(ours[k], v) for k, v in ref.state_dict().items())

    regnet = timm.create_model("regnetx_002")
    torch.save({"state_dict": regnet.state_dict(), "epoch": 3, "arch": "regnetx_002"}, tmp_path / "regnet.pth")
    cfg = {**vit_cfg(**{"from": str(tmp_path / "regnet.pth"), "strict": True}),
           "backbone": {"type": "regnet", "variant": "regnetx_002"}}
    student = build_model(cfg, initialise=True)
    body = student.backbone.body.state_dict()
    assert student.init_report.loaded and all(torch.equal(body[k.split("backbone.body.")[1]],
                                                          regnet.state_dict()[k.split("backbone.body.")[1]])
                                              for k in student.init_report.loaded)


def test_foreign_truncated_and_pickled_files_are_refused(tmp_path, yolov8n_file):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    sam = Sam(ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, out_chans=16),
              PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4),
              MaskDecoder(transformer_dim=16,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=16, num_heads=2, mlp_dim=32)))
    torch.save(sam.state_dict(), tmp_path / "sam.pth")  # segment-anything's checkpoint layout
    for cfg in (yolo_cfg(**{"from": str(tmp_path / "sam.pth")}), vit_cfg(**{"from": str(tmp_path / "sam.pth")})):
        with pytest.raises((CheckpointError, ConfigError), match="image_encoder"):
            build_model(cfg, initialise=True)
    with pytest.raises(ConfigError, match="YOLOv8n, the student a yolov8 .s.*yolov8n.yaml"):  # n file, s student
        build_model({**yolo_cfg(**{"from": str(yolov8n_file)}), "backbone": {"type": "yolov8", "variant": "s"}},
                    initialise=True)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(yolov8n_file.read_bytes()[: yolov8n_file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_model(yolo_cfg(**{"from": str(truncated)}), initialise=True)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": Payload(), "train_args": {}}, tmp_path / "payload.pt")
    with pytest.raises(CheckpointError, match="refused: it contains pickled Python objects"):
        build_model(yolo_cfg(**{"from": str(tmp_path / "payload.pt")}), initialise=True)
    yolo = torch.load(yolov8n_file, weights_only=False)  # an ultralytics file carrying one more object
    yolo["model"].model[0].hook = Payload()
    torch.save(yolo, tmp_path / "payload_in_yolo.pt")
    with pytest.raises(CheckpointError, match="refused: it references posix.system"):
        build_model(yolo_cfg(**{"from": str(tmp_path / "payload_in_yolo.pt")}), initialise=True)
    assert not marker.exists()
    # a vfmkd file of another size: only BatchNorm step counters (integers) had the student's shapes
    torch.save(build_model({**yolo_cfg(), "backbone": {"type": "yolov8", "variant": "s"}}).state_dict(),
               tmp_path / "yolov8s_run.pt")
    with pytest.raises(CheckpointError, match=r"nothing in .*yolov8s_run.pt fits.*backbone.stem.0.conv.weight is "
                                              r"\[32, 3, 3, 3\] in the file, \[16, 3, 3, 3\] in the student"):
        build_model(yolo_cfg(**{"from": str(tmp_path / "yolov8s_run.pt")}), initialise=True)
    with pytest.raises(ConfigError, match="unknown key 'form'.*'from'"):
        build_model(yolo_cfg(form="x.pt"), initialise=True)


def small_run(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [f"experiment_name={name}", f"work_dir={tmp_path}", "data.limit=4", "data.img_size=64", "data.batch_size=4",
            "data.num_workers=0", "train.epochs=1", "train.warmup_iters=1", "eval.batch_size=4", "train.vis_interval=0",
            "train.loggers=[]", *extra]


def test_second_run_continues_from_the_first(tmp_path, caplog):
    """Seed 001's recipe as two runs: train the base on the task, then fine-tune it with distillation
    (here from the base itself as a live vfmkd teacher), weights only: a new optimizer and epoch count."""
    base_cfg = tmp_path / "base.yaml"
    base_cfg.write_text(yaml.safe_dump({
        "model": {"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 80}}},
        "distillation": {"losses": {"detection": {"weight": 1.0}}}}))
    assert run_tool(train_tool.main, ["--no-progress", str(base_cfg), *small_run(tmp_path, "base")]) == 0
    best = next(tmp_path.glob("base/*/checkpoints/best.pt"))
    fine = load_experiment(REPO / "configs/experiments/yolov8n_from_yolov8s_coco128.yaml", small_run(
        tmp_path, "fine", f"teachers.yolov8s.checkpoint={best}", f"model.init.from={best}", "model.init.strict=true"))
    trainer = Trainer(fine, progress=False)
    weights = load_checkpoint(best)["model"]
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    metrics = trainer.fit()
    assert [e["epoch"] for e in metrics["epochs"]] == [1]  # its own epochs, from the first
    log = (trainer.run_dir / "train.log").read_text()
    assert f"model.init: vfmkd run file {best}" in log and "skipped 0, shape-mismatched 0, missing 0" in log
    # Bad inputs through the tool: one line, exit 2.
    caplog.clear()
    assert run_tool(train_tool.main, ["--no-progress", str(base_cfg), *small_run(tmp_path, "bad"),
                                      "model.heads.detection.reg_max=8", f"model.init.from={best}",
                                      "model.init.strict=true"]) == 2
    assert "shape-mismatched" in caplog.text and not list(tmp_path.glob("bad/*"))
    assert json.loads((trainer.run_dir / "metrics.json").read_text())["epochs"]
