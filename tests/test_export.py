"""tools/export.py: the student leaves vfmkd as ONNX (equal to PyTorch under ONNX Runtime on real
coco128 images), TorchScript, or an ultralytics checkpoint that `ultralytics.YOLO` predicts with
the same boxes; adapters stay behind; NaN weights and unknown formats are refused."""
from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from torchvision.ops import box_iou

from vfmkd.core.config import load_experiment
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.datasets.transforms import letterbox
from vfmkd.distillation.distiller import Distiller
from vfmkd.engine.builders import build_loss_terms, build_model
from vfmkd.engine.export.exporter import onnx_session
from vfmkd.engine.training.run_dir import write_run_config
from vfmkd.utils.checkpoint import save_checkpoint
from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import export as export_tool  # noqa: E402

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
IMG = 160
VAL_IMAGES = ("000000000139.jpg", "000000000285.jpg", "000000000632.jpg")


def _trained_like(model: torch.nn.Module) -> None:
    """Weights with the statistics of a trained student (non-trivial BatchNorm, a head whose scores
    and boxes vary over the image), so equality checks see realistic values."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.empty_like(m.running_mean).uniform_(-0.2, 0.2, generator=g))
            m.running_var.copy_(torch.empty_like(m.running_var).uniform_(0.5, 2.0, generator=g))
            m.weight.data.uniform_(0.7, 1.3, generator=g)
            m.bias.data.uniform_(-0.1, 0.1, generator=g)
    detect = model.heads["detection"].detect
    for box, cls in zip(detect.cv2, detect.cv3):
        box[-1].weight.data.normal_(0, 1.0, generator=g)
        cls[-1].weight.data.normal_(0, 1.0, generator=g)
        cls[-1].bias.data.fill_(-1.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as tools/train.py leaves it: config.yaml and checkpoints/best.pt with the keys
    Trainer.save() writes (model, distiller with an adapter, teacher_stats, optimizer, ...)."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_experiment(EXPERIMENT, [f"data.img_size={IMG}", "data.limit=8", f"work_dir={root}"])
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    with torch.no_grad():
        _trained_like(model)
    sam = (FeatureSpec("image_embeddings", 256, 16),)
    distiller = Distiller(build_loss_terms(cfg["distillation"]["losses"], model, {"sam": sam},
                                           {"sam": "image_embeddings"}))
    assert sum(p.numel() for p in distiller.parameters()) > 0, "the checkpoint should carry adapters"
    write_run_config(root, cfg)
    (root / "checkpoints").mkdir()
    save_checkpoint(root / "checkpoints" / "best.pt", {
        "model": model.state_dict(), "distiller": distiller.state_dict(), "teacher_stats": {},
        "optimizer": {}, "epoch": 1, "config": cfg, "metrics": {}})
    model.eval()
    return {"dir": root, "ckpt": root / "checkpoints" / "best.pt", "model": model, "distiller": distiller, "cfg": cfg}


@pytest.fixture(scope="module")
def images(coco128):
    """Real coco128 val images, letterboxed as vfmkd feeds them: (name, BGR original, (1, 3, IMG, IMG), affine)."""
    out = []
    for name in VAL_IMAGES:
        bgr = cv2.imread(str(coco128 / "images" / "val2017" / name))
        canvas, affine = letterbox(bgr[:, :, ::-1], IMG)
        x = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1)[None].float() / 255
        out.append((name, bgr, x, affine))
    return out


def torch_out(model, x):
    with torch.no_grad():
        return model(x).heads["detection"][0]


def assert_close(got: np.ndarray, want: torch.Tensor, what: str, size: int = IMG) -> None:
    """ONNX vs PyTorch within 1e-4: class probabilities absolutely, xywh boxes in units of the input
    size (they reach ~500 px, where one float32 step is 6e-5 px); and boxes within 1e-3 px."""
    want = want.numpy()
    d = np.abs(got - want)
    boxes, scores = d[:, :4].max(), d[:, 4:].max()
    assert scores < 1e-4 and boxes / size < 1e-4 and boxes < 1e-3, (what, boxes, scores)


def export(*argv) -> int:
    return run_tool(export_tool.main, [str(a) for a in argv])


def test_onnx_equals_torch_on_coco128_without_adapters(run, images, tmp_path):
    out = tmp_path / "student.onnx"
    assert export(run["ckpt"], "--format", "onnx", "--output", out) == 0  # positional checkpoint, run's config.yaml
    assert out.is_file() and not list(tmp_path.glob(".*tmp*")), "no temp file left behind"
    session = onnx_session(out)
    for name, _, x, _ in images:
        got = session.run(None, {"images": x.numpy()})
        assert len(got) == 1 and got[0].shape == (1, 84, (IMG // 8) ** 2 + (IMG // 16) ** 2 + (IMG // 32) ** 2)
        assert_close(got[0], torch_out(run["model"], x), name)
    # Nothing of the distiller is in the graph: no adapter name, no adapter weight, and no more
    # weight values than the student has (constant folding adds only small constants).
    graph = onnx.load(str(out)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    assert not [n for n in inits if "adapter" in n or "distiller" in n or "loss" in n]
    adapter_weights = [p.detach().numpy() for p in run["distiller"].parameters() if p.dim() > 1]
    for w in adapter_weights:
        assert not any(a.shape == w.shape and np.allclose(a, w) for a in inits.values())
    student = sum(t.numel() for t in run["model"].state_dict().values())
    assert sum(a.size for a in inits.values()) <= student + 10_000


def test_onnx_dynamic_two_batch_sizes(run, images, tmp_path):
    out = tmp_path / "dyn.onnx"
    assert export("--checkpoint", run["ckpt"], "--format", "onnx", "--dynamic", "--output", out) == 0
    session = onnx_session(out)
    batch3 = torch.cat([x for _, _, x, _ in images])
    batch2 = torch.nn.functional.interpolate(batch3[:2], size=(224, 192), mode="bilinear")  # another size too
    for x in (batch3, batch2):
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape[0] == x.shape[0]
        assert_close(got, torch_out(run["model"], x), str(tuple(x.shape)), max(x.shape[-2:]))


def test_torchscript_equals_torch(run, images, tmp_path):
    out = tmp_path / "student.torchscript"
    assert export(run["ckpt"], "--format", "torchscript", "--dynamic", "--output", out) == 0
    ts = torch.jit.load(str(out))
    assert not [k for k in ts.state_dict() if "adapter" in k or "distiller" in k]
    batch = torch.cat([x for _, _, x, _ in images])
    with torch.no_grad():
        got = ts(batch)
    assert torch.allclose(got, torch_out(run["model"], batch), atol=1e-5, rtol=0)
    folder = tmp_path / "exports"
    folder.mkdir()  # --output a folder: the default name (the checkpoint's stem) inside it
    assert export(run["ckpt"], "--format", "torchscript", "--output", folder) == 0
    assert (folder / (Path(run["ckpt"]).stem + ".torchscript")).is_file()


def _vfmkd_boxes(model, x, affine, shape, conf, iou):
    from ultralytics.utils.nms import non_max_suppression

    det = non_max_suppression(torch_out(model, x), conf_thres=conf, iou_thres=iou, max_det=300)[0]
    sx, sy, ox, oy = affine
    boxes = det[:, :4].clone()
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - ox) / sx).clamp(0, shape[1])
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - oy) / sy).clamp(0, shape[0])
    return boxes, det[:, 4], det[:, 5]


def _matched(a_box, a_conf, a_cls, b_box, b_conf, b_cls) -> torch.Tensor:
    """For each box of a: is there a box of b with the same class, IoU > 0.99 and score within 1e-3?"""
    if len(b_box) == 0:
        return torch.zeros(len(a_box), dtype=torch.bool)
    ok = (box_iou(a_box, b_box) > 0.99) & (a_cls[:,
                                                 None] == b_cls[None]) & ((a_conf[:, None] - b_conf[None]).abs() < 1e-3)
    return ok.any(1)


def test_ultralytics_checkpoint_predicts_the_same_boxes(run, images, tmp_path):
    from ultralytics import YOLO

    out = tmp_path / "student.pt"
    assert export(run["ckpt"], "--format", "ultralytics", "--output", out) == 0
    with zipfile.ZipFile(out) as z:  # a plain ultralytics pickle: nothing of vfmkd needed to load it
        assert not any(b"vfmkd." in z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    yolo = YOLO(str(out))
    # The network itself: ultralytics' DetectionModel equals the student on the same tensor.
    net = yolo.model.eval()
    for _, _, x, _ in images:
        with torch.no_grad():
            assert (net(x)[0] - torch_out(run["model"], x)).abs().max() < 1e-4
    # End to end: ultralytics' own preprocessing (rect=False: the square letterbox vfmkd uses),
    # inference (Conv+BN fused, so scores move by ~1e-7) and NMS against vfmkd's letterbox + NMS. This
    # synthetic head scores many overlapping boxes almost alike, where NMS could flip on such noise, so
    # the threshold sits in the widest score gap that keeps 8 to 20 candidates.
    for name, bgr, x, affine in images[:2]:
        scores = torch_out(run["model"], x)[0, 4:].max(0).values.sort(descending=True).values[:21]
        k = int((scores[7:20] - scores[8:21]).argmax()) + 8
        conf, iou = float(scores[k - 1] + scores[k]) / 2, 0.7
        r = yolo.predict(bgr, imgsz=IMG, conf=conf, iou=iou, rect=False, verbose=False)[0].boxes
        vb, vc, vk = _vfmkd_boxes(run["model"], x, affine, bgr.shape, conf, iou)
        assert 3 <= len(vb) == len(r), (name, len(r), len(vb))
        assert _matched(r.xyxy, r.conf, r.cls, vb, vc, vk).all() and _matched(vb, vc, vk, r.xyxy, r.conf, r.cls).all()
        assert torch.allclose(r.xyxy, vb, atol=0.05) and torch.equal(r.cls, vk), name


def test_stored_config_when_outside_a_run_dir(run, tmp_path):
    lone = tmp_path / "lone.pt"
    lone.write_bytes(run["ckpt"].read_bytes())
    assert export(lone, "--format", "torchscript", "--imgsz", "128") == 0
    assert (tmp_path / "lone.torchscript").is_file()


def test_nan_checkpoint_is_refused(run, tmp_path, caplog):
    state = torch.load(run["ckpt"], weights_only=True)
    key = next(k for k in state["model"] if k.endswith("bn.running_var"))
    state["model"][key] = state["model"][key].clone()
    state["model"][key][0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)  # save_checkpoint would refuse to write it
    out = tmp_path / "nan.onnx"
    assert export(bad, "--config", run["dir"] / "config.yaml", "--output", out) == 2
    assert "NaN/inf" in caplog.text and key in caplog.text
    assert not out.exists()


def test_onnx_mismatch_writes_nothing(run, tmp_path, monkeypatch, caplog):
    import vfmkd.engine.export.exporter as engine

    monkeypatch.setattr(engine, "compare_onnx", lambda *a: {"max_abs": 0.5, "max_scaled": 0.5})
    out = tmp_path / "bad.onnx"
    assert export(run["ckpt"], "--output", out) == 1
    assert "differs from PyTorch" in caplog.text and not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--format", "tflite"], ["--format", "ultralytics", "--dynamic"], ["--imgsz", "100"],
                                  ["stray_arg"]])
def test_bad_arguments_are_refused(run, tmp_path, argv, caplog):
    assert export(run["ckpt"], "--output", tmp_path / "x.onnx", *argv) == 2
    assert not (tmp_path / "x.onnx").exists()
    if argv[1:2] == ["tflite"]:
        assert "onnx, torchscript, ultralytics" in caplog.text


def test_mismatched_config_and_foreign_layout_are_named(run, tmp_path, caplog):
    # A checkpoint whose config says another backbone does not fit; a non-YOLOv8 layout is named.
    from vfmkd.engine.export.ultralytics_layout import ultralytics_layout_problem

    cfg = load_experiment(EXPERIMENT, ["model.neck.depth=2"])
    assert "neck depth 2" in ultralytics_layout_problem(cfg)
    assert export(run["ckpt"], "--format", "onnx", "model.backbone.variant=s", "--output", tmp_path / "s.onnx") == 2
    assert "does not fit" in caplog.text
