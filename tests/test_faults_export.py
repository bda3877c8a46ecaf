"""Issue 22, the export faults: an instance head exports its prototypes (masks from the exported
outputs equal PyTorch's under ONNX Runtime and TorchScript), a dynamic DSRL export follows the input
size (and the tool's own check at a second size catches a frozen one), a promptable student exports
encoder + decoder as TorchScript, bad sizes and outputs are one message (exit 2), the output never
replaces a training checkpoint, and no temp file outlives an export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfmkd.core.config import experiment_from_dict
from vfmkd.datasets.transforms import letterbox
from vfmkd.engine.builders import build_model
from vfmkd.engine.export.exporter import load_student, onnx_session
from vfmkd.utils.checkpoint import save_checkpoint
from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import export as export_tool  # noqa: E402

IMG = 128
SEG_HEADS = {"instance": {"type": "yolo_seg_head", "num_classes": 4, "num_masks": 8, "num_protos": 16},
             "semantic": {"type": "semantic_head", "num_classes": 5, "output_stride": 8}}
REGNET = {"type": "regnet", "config": "configs/backbones/regnetx_002.yaml"}


def write_run(path: Path, heads: dict, backbone: dict | None = None, scale: float | None = None) -> Path:
    """``<run>/checkpoints/<name>.pt`` in the trainer's layout (the stored config is used)."""
    raw = {"experiment_name": "faults_export",
           "model": {"backbone": backbone or {"type": "yolov8", "variant": "n"},
                     "neck": {"type": "yolov8_pafpn", "depth": 1}, "heads": heads},
           "data": {"dataset": "coco128", "root": str(REPO / "datasets/coco128"), "img_size": IMG}}
    if scale:
        raw["model"]["resolution_distill"] = {"enabled": True, "sr_target_scale": scale, "head": "semantic"}
    cfg = experiment_from_dict(raw)
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    if "instance" in model.heads:  # coefficients of a trained head's size: masks that vary over the image
        detect = model.heads["instance"].detect
        for conv in [branch[-1] for branch in detect.cv4]:
            torch.nn.init.normal_(conv.weight, 0.0, 4.0), torch.nn.init.normal_(conv.bias, 0.0, 2.0)
        for conv in (detect.proto.cv1.conv, detect.proto.cv2.conv, detect.proto.cv3.conv):
            torch.nn.init.normal_(conv.weight, 0.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": model.state_dict(), "distiller": {}, "teacher_stats": {}, "optimizer": {},
                           "scheduler": {}, "epoch": 1, "config": cfg, "metrics": {},
                           "resume": {"epoch": 2, "batch": 0}})
    return path


def model_cfg(ckpt: Path) -> dict:
    return dict(torch.load(ckpt, weights_only=True)["config"]["model"])


def student(ckpt: Path):
    return load_student(ckpt, torch.load(ckpt, weights_only=True)["config"], "stored")


def export(*argv) -> int:
    return run_tool(export_tool.main, [str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"seg": write_run(root / "seg" / "checkpoints" / "best.pt", SEG_HEADS),
            "dsrl": write_run(root / "dsrl" / "checkpoints" / "best.pt", SEG_HEADS, REGNET, scale=2.0)}


@pytest.fixture(scope="module")
def image(coco128):
    bgr = cv2.imread(str(coco128 / "images" / "val2017" / "000000000139.jpg"))
    canvas, _ = letterbox(bgr[:, :, ::-1], IMG)
    return torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1)[None].float() / 255


def masks_of(pred: torch.Tensor, proto: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """sigmoid(coefficients x prototypes) of the chosen anchors: (K, h, w) for image 0."""
    nm = proto.shape[1]
    return torch.sigmoid(pred[0, -nm:, anchors].T @ proto[0].flatten(1)).reshape(len(anchors), *proto.shape[-2:])


def pytorch_instance(model, x):
    with torch.no_grad():
        out = model(x).heads
    (pred, proto), _ = out["instance"]
    return pred, proto, out["semantic"]


def assert_masks_match(got_pred, got_proto, want_pred, want_proto) -> None:
    anchors = want_pred[0, 4:-want_proto.shape[1]].amax(0).topk(50).indices
    got, want = masks_of(got_pred, got_proto, anchors), masks_of(want_pred, want_proto, anchors)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    assert want.std() > 0.05  # masks, not a constant


# ----------------------------------------------------------------- item 2: instance masks from the export
def test_seg_onnx_and_torchscript_export_prototypes_and_their_masks_match_pytorch(runs, image, tmp_path):
    ckpt = runs["seg"]
    model = student(ckpt)
    want_pred, want_proto, want_sem = pytorch_instance(model, image)
    out = tmp_path / "seg.onnx"
    assert export(ckpt, "--output", out) == 0
    session = onnx_session(out)
    assert [o.name for o in session.get_outputs()] == ["output_instance", "proto_instance", "output_semantic"]
    pred, proto, sem = (torch.from_numpy(a) for a in session.run(None, {"images": image.numpy()}))
    assert proto.shape == want_proto.shape == (1, 8, IMG // 4, IMG // 4)
    assert_masks_match(pred, proto, want_pred, want_proto)
    assert (sem - want_sem).abs().max() < 1e-4
    ts_path = tmp_path / "seg.torchscript"
    assert export(ckpt, "--format", "torchscript", "--output", ts_path) == 0
    extra = {"output_names.json": ""}
    ts = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["output_names.json"]) == ["output_instance", "proto_instance", "output_semantic"]
    with torch.no_grad():
        pred, proto, sem = ts(image)
    assert_masks_match(pred, proto, want_pred, want_proto)
    assert (sem - want_sem).abs().max() < 1e-4
    # One head: ultralytics' own names for a seg export (output0 predictions, output1 prototypes).
    from vfmkd.engine.export.student_graph import export_outputs

    one = build_model({"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                       "heads": {"instance": SEG_HEADS["instance"]}})
    assert [(o.name, o.kind) for o in export_outputs(one)] == [("output0", "predictions"), ("output1", "proto")]


# ----------------------------------------------------------------- item 3: dynamic DSRL follows the input size
def test_dsrl_downscale_keeps_the_training_sizes():
    from vfmkd.models.input_scale import downscaled_size

    for scale in (1.2, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 1.75):
        for n in range(32, 2049, 7):
            assert downscaled_size(n, n, scale) == (int(n / scale + 0.5),) * 2, (scale, n)


def test_dynamic_dsrl_export_follows_the_input_size(runs, tmp_path):
    ckpt = runs["dsrl"]
    model = student(ckpt)
    assert model.input_scale == 2.0
    out = tmp_path / "dsrl.onnx"
    assert export(ckpt, "--output", out, "--dynamic") == 0
    session = onnx_session(out)
    ts_path = tmp_path / "dsrl.torchscript"
    assert export(ckpt, "--format", "torchscript", "--output", ts_path, "--dynamic") == 0
    ts = torch.jit.load(str(ts_path))
    from vfmkd.engine.export.student_graph import size_multiple  # the log names the sizes a dynamic export takes

    assert size_multiple(model) == 64 and size_multiple(build_model({**model_cfg(ckpt), "resolution_distill": {
        "enabled": True, "sr_target_scale": 1.5, "head": "semantic"}})) == 48
    for shape in ((2, 3, 256, 192),):  # another batch, height and width than the traced (1, 3, 128, 128)
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
        want_pred, want_proto, want_sem = pytorch_instance(model, x)
        assert want_pred.shape[-1] == sum((shape[2] // 2 // s) * (shape[3] // 2 // s) for s in (8, 16, 32))
        for got in ([torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()})], list(ts(x))):
            assert [tuple(t.shape) for t in got] == [tuple(want_pred.shape), tuple(want_proto.shape),
                                                     tuple(want_sem.shape)], shape
            assert_masks_match(got[0], got[1], want_pred, want_proto)
            assert (got[0][:, 4:] - want_pred[:, 4:]).abs().max() < 1e-4 and (got[2] - want_sem).abs().max() < 1e-4


def test_the_dynamic_check_catches_a_size_frozen_into_the_graph(runs, tmp_path, monkeypatch, caplog):
    import vfmkd.models.unified_model as unified

    def frozen(x, scale):  # the old downscale: int() turns the traced size into a constant
        size = (int(x.shape[-2] / scale + 0.5), int(x.shape[-1] / scale + 0.5))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    monkeypatch.setattr(unified, "downscale_input", frozen)
    out = tmp_path / "frozen.onnx"
    assert export(runs["dsrl"], "--output", out, "--dynamic") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


# ----------------------------------------------------------------- item 4: promptable TorchScript
def test_promptable_torchscript_exports_encoder_and_decoder(tmp_path):
    from vfmkd.engine.export.promptable import box_prompt, point_prompt

    ckpt = write_run(tmp_path / "run" / "checkpoints" / "best.pt", {"promptable": {"type": "sam_decoder"}})
    out = tmp_path / "best.torchscript"
    assert export(ckpt, "--format", "torchscript", "--output", out) == 0
    enc, dec = tmp_path / "best.encoder.torchscript", tmp_path / "best.decoder.torchscript"
    assert enc.is_file() and dec.is_file() and not out.exists()
    model = student(ckpt)
    head = model.heads["promptable"]
    image = torch.rand(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    boxes = torch.tensor([[8.0, 10.0, 90.0, 100.0], [50.0, 4.0, 120.0, 60.0], [0.0, 0.0, 128.0, 128.0]])
    points = torch.tensor([[[30.0, 40.0], [70.0, 90.0], [100.0, 20.0]]])
    with torch.no_grad():
        emb = head(model.neck(model.backbone(image)))
        got_emb = torch.jit.load(str(enc))(image)
        assert (got_emb - emb).abs().max() < 1e-4
        decoder = torch.jit.load(str(dec))
        for (coords, labels), kwargs in ((box_prompt(boxes), {"boxes": boxes}),
                                         (point_prompt(points), {"points": points})):
            masks, iou = decoder(emb, coords, labels)
            w_masks, w_iou = head.decode(emb, torch.zeros(len(coords), dtype=torch.long), **kwargs)
            assert masks.shape == (len(coords), 1, IMG // 4, IMG // 4)
            assert (masks - w_masks).abs().max() < 1e-3 * max(1.0, float(w_masks.abs().max()))
            assert (iou - w_iou).abs().max() < 1e-4


# ----------------------------------------------------------------- items 5, 10: sizes and outputs
@pytest.mark.parametrize("run,argv,says", [
    ("seg", ["--imgsz", "0"], "--imgsz 0 must be a positive multiple of 32"),
    ("seg", ["--imgsz", "0", "--format", "torchscript"], "--imgsz 0 must be a positive multiple of 32"),
    ("prompt", ["--imgsz", "-32"], "--imgsz -32 must be a positive multiple of 32"),
    ("dsrl", ["--imgsz", "96"], "--imgsz 96 / sr_target_scale 2 = 48 is not a multiple"),
])
def test_sizes_the_model_cannot_take_are_one_message(runs, tmp_path, run, argv, says, caplog):
    ckpt = runs[run] if run in runs else write_run(tmp_path / "p" / "checkpoints" / "best.pt",
                                                   {"promptable": {"type": "sam_decoder"}})
    out = tmp_path / "out" / "m.onnx"
    assert export(ckpt, "--output", out, *argv) == 2
    assert says in caplog.text and "Traceback" not in caplog.text
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_an_unwritable_output_names_the_users_path(runs, caplog):
    assert export(runs["seg"], "--output", "/proc/m.onnx") == 2
    assert "--output /proc/m.onnx" in caplog.text and ".tmp" not in caplog.text


def test_no_temp_file_outlives_an_export(runs, tmp_path, monkeypatch):
    import vfmkd.engine.export.exporter as engine

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".m.onnx.tmp{dead.pid}", tmp_path / f".m.onnx.tmp{os.getppid()}"
    stale.write_bytes(b"partial"), live.write_bytes(b"another export, still running")
    assert export(runs["seg"], "--output", tmp_path / "m.onnx") == 0
    assert not stale.exists() and live.exists()  # a killed export's temp goes; a running one's stays

    def interrupted(*a, **k):  # Ctrl-C (or SIGTERM, which the tools turn into the same) mid-export
        Path(a[2]).write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.torch.onnx, "export", interrupted)
    assert export(runs["seg"], "--output", tmp_path / "k.onnx") == 130
    assert not (tmp_path / "k.onnx").exists() and not list(tmp_path.glob(".k.onnx.tmp*"))


# ----------------------------------------------------------------- item 7: never replace a training checkpoint
def test_an_export_never_replaces_a_training_checkpoint(tmp_path, caplog):
    heads = {"detection": {"type": "yolo_head", "num_classes": 80}}
    last = write_run(tmp_path / "run" / "checkpoints" / "last.pt", heads)
    other = write_run(tmp_path / "other" / "checkpoints" / "best.pt", heads)
    mine = tmp_path / "mine.pt"
    mine.write_bytes(last.read_bytes())
    before = {p: p.read_bytes() for p in (last, other, mine)}
    for argv, says in (
            (["--format", "ultralytics", "--output", last], "is the checkpoint being exported"),
            (["--format", "ultralytics", "--output", other.parent / "last.prev.pt"], "a run checkpoint's name"),
            (["--format", "torchscript", "--output", other], "a run checkpoint's name"),
            (["--format", "ultralytics", "--output", mine], "is a vfmkd training checkpoint")):
        caplog.clear()
        assert export(last, *argv) == 2, argv
        assert says in caplog.text and ("last.ultralytics.pt" in caplog.text or "last.torchscript" in caplog.text)
    assert {p: p.read_bytes() for p in before} == before
    assert not (other.parent / "last.prev.pt").exists()
    # the default ultralytics name beside it is not a checkpoint name: it is written
    assert export(last, "--format", "ultralytics", "--imgsz", "64") == 0
    assert (last.parent / "last.ultralytics.pt").is_file() and last.read_bytes() == before[last]
