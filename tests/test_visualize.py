"""Visual artefacts on real coco128 images: prediction panels, PCA panels, test_results.txt, loggers."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from vfmkd.core.errors import ConfigError
from vfmkd.datasets import DetectionDataset, collate_samples
from vfmkd.engine.evaluation import results_text
from vfmkd.engine.pictures import feature_pca, prediction_panel, vis_canvas
from vfmkd.engine.pictures.prediction_panel import _draw, difference_map
from vfmkd.engine.training.loggers import RunLoggers, check_loggers
from vfmkd.tasks.pictures import PanelRow, Prediction

S = 128


@pytest.fixture(scope="module")
def batch(coco128):
    ds = DetectionDataset(str(coco128), "val2017", img_size=S, limit=4)
    return collate_samples([ds[i] for i in range(len(ds))])


def xyxy_per_image(batch):
    """Ground-truth boxes (n, 4) xyxy canvas pixels and classes (n,) per image."""
    out = []
    for i in range(len(batch)):
        cls, b = batch.boxes.of_image(i)
        xyxy = torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1) * S
        out.append((xyxy, cls.long()))
    return out


def box_masks(gt, size, shrink=0.0):
    """Instance masks (n, size, size) filling each box (optionally shrunk), as a stand-in prediction."""
    masks = []
    for xyxy, _ in gt:
        m = torch.zeros(len(xyxy), size, size, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate((xyxy * size / S).tolist()):
            dx, dy = (x2 - x1) * shrink, (y2 - y1) * shrink
            m[j, int(y1 + dy):int(np.ceil(y2 - dy)), int(x1 + dx):int(np.ceil(x2 - dx))] = True
        masks.append(m)
    return masks


def cell(png: np.ndarray, row: int, col: int, margin: int = 3) -> np.ndarray:
    x0, y0, x1, y1 = vis_canvas.cell_box(row, col)
    return png[y0 + margin:y1 - margin, x0 + margin:x1 - margin].astype(np.int16)


def uniform(c: np.ndarray) -> bool:
    return int(np.ptp(c.reshape(-1, 3), axis=0).max()) <= 2


def message(c: np.ndarray) -> bool:
    """A grey message cell ("no teacher output", "no student map"): mostly the 0.9 grey."""
    return float((np.abs(c - 230).max(-1) <= 1).mean()) > 0.8


def read(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_panel_has_the_grid_and_differs_where_predictions_differ(batch, tmp_path):
    gt = xyxy_per_image(batch)
    n = len(batch)
    assert n == 4 and all(len(c) for _, c in gt), "coco128 val images with boxes expected"
    # binary 'person' maps from the boxes of class 0 (stride 4 like a head), teacher softer than student
    person = torch.zeros(n, S // 4, S // 4)
    for i, (xyxy, cls) in enumerate(gt):
        for (x1, y1, x2, y2), k in zip((xyxy / 4).tolist(), cls.tolist()):
            if k == 0:
                person[i, int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1.0
    teacher_bin, student_bin = person * 0.9, (person * 0.6).roll(3, dims=-1)
    semantic = torch.zeros(n, S // 8, S // 8, dtype=torch.long)
    semantic[:, 4:12, 2:10] = 5
    rows = [
        PanelRow("det", student=Prediction.detections([b + 4 for b, _ in gt], [c for _, c in gt],
                                                      [torch.full((len(c),), 0.7) for _, c in gt]),
                 teacher=Prediction.detections([b for b, _ in gt], [c for _, c in gt]),
                 target=Prediction.detections([b for b, _ in gt], [c for _, c in gt]), class_names=["person"] * 80),
        PanelRow("seg", student=Prediction.instances(box_masks(gt, S // 4, 0.2), [c for _, c in gt]),
                 teacher=Prediction.instances([m.float() * 0.8 for m in box_masks(gt, S // 4)], [c for _, c in gt]),
                 target=Prediction.instances(box_masks(gt, S // 4), [c for _, c in gt], boxes=[b for b, _ in gt])),
        PanelRow("bin", student=Prediction.binary(student_bin), teacher=Prediction.binary(teacher_bin),
                 target=Prediction.binary_target(torch.where(person.bool(), 1, 0).to(torch.uint8))),
        PanelRow("sem", student=Prediction.semantic(labels=semantic), teacher=None,
                 target=Prediction.semantic(labels=semantic)),
    ]
    out = prediction_panel.render_panel(vis_canvas.visualization_path(tmp_path, "epoch", 3), batch.images, rows,
                                        image_ids=batch.image_ids, max_images=2, title="epoch 3")
    assert out == tmp_path / "visualizations" / "epoch_003.png"
    assert not [p for p in out.parent.iterdir() if p.name != out.name], "no temp file left behind"
    png = read(out)
    assert (png.shape[1], png.shape[0]) == vis_canvas.panel_size(2 * len(rows), len(prediction_panel.PANEL_COLUMNS))

    # input cells show the image (not blank), identical across the heads of one image
    assert cell(png, 0, 0).std() > 10
    assert np.array_equal(cell(png, 0, 0), cell(png, 3, 0))
    # binary row of image 0: teacher != student (values and shift), difference map not black
    r = 2
    assert np.abs(cell(png, r, 2) - cell(png, r, 3)).mean() > 1
    assert cell(png, r, 6).mean() > 1
    # semantic row: no teacher -> the message cells are uniform-ish grey, not the diff colormap
    assert all(message(cell(png, 3, c)) for c in (2, 4, 6)) and not message(cell(png, 2, 6))
    # same call with the student equal to the teacher: the diff cell becomes uniform (zero map)
    rows_same = [PanelRow("bin", student=Prediction.binary(teacher_bin), teacher=Prediction.binary(teacher_bin))]
    same = read(prediction_panel.render_panel(tmp_path / "same.png", batch.images, rows_same, max_images=1))
    diff = read(prediction_panel.render_panel(tmp_path / "diff.png", batch.images, rows[2:3], max_images=1))
    assert np.array_equal(cell(same, 0, 2), cell(same, 0, 3))
    assert uniform(cell(same, 0, 6, margin=20))  # |t - s| = 0 everywhere (note text sits in a corner)
    assert not uniform(cell(diff, 0, 6, margin=20))
    assert np.array_equal(cell(same, 0, 0), cell(diff, 0, 0)) and np.array_equal(cell(same, 0, 2), cell(diff, 0, 2))
    assert not np.array_equal(cell(same, 0, 3), cell(diff, 0, 3))


def test_difference_maps_per_kind():
    hw = (8, 8)
    p = torch.zeros(1, 8, 8)
    p[0, :4] = 1.0
    t = _draw(Prediction.binary(p), 0, hw, None)
    s = _draw(Prediction.binary(p.flip(1)), 0, hw, None)
    d = difference_map(t, s, "binary")
    assert d.shape == hw and d.min() == 1.0  # top half on vs bottom half on: every pixel differs
    assert np.allclose(difference_map(t, t, "binary"), 0)
    lab = torch.zeros(1, 4, 4, dtype=torch.long)
    lab[0, 0, 0] = 3
    d = difference_map(_draw(Prediction.semantic(lab), 0, hw, None),
                       _draw(Prediction.semantic(torch.zeros_like(lab)), 0, hw, None), "semantic")
    assert d.sum() == 4  # one stride-2 cell -> 2x2 pixels disagree
    probs = torch.softmax(torch.randn(1, 5, 4, 4), 1)
    d = difference_map(_draw(Prediction.semantic(probs=probs), 0, hw, None),
                       _draw(Prediction.semantic(probs=probs), 0, hw, None), "semantic")
    assert np.allclose(d, 0)
    box = [torch.tensor([[0.0, 0.0, 4.0, 4.0]])]
    d = difference_map(_draw(Prediction.detections(box, [torch.tensor([1])]), 0, hw, None),
                       _draw(Prediction.detections([box[0] + 4], [torch.tensor([1])]), 0, hw, None), "boxes")
    assert d.sum() == 32
    with pytest.raises(ValueError, match="needs masks, cls"):
        Prediction("instance")


def test_pca_uses_the_teacher_projection(batch, tmp_path):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 32, 8, 8, generator=g) + batch.images[:, :1, ::16, ::16] * 3
    valid = torch.ones(4, 8, 8, dtype=torch.bool)
    valid[:, 6:] = False  # letterbox padding rows
    t_rgb, s_rgb = feature_pca.pca_project(teacher, teacher.clone(), valid)
    assert t_rgb.shape == (4, 8, 8, 3) and np.array_equal(t_rgb, s_rgb)
    assert t_rgb[:, 6:].max() == 0 and t_rgb[:, :6].max() == pytest.approx(1.0, abs=1e-6)
    # the projection is the teacher's: a student with a scaled copy is clipped to the teacher range,
    # a student with the teacher's channel count only
    _, s2 = feature_pca.pca_project(teacher, teacher * 5, valid)
    assert not np.array_equal(t_rgb, s2) and s2.max() <= 1.0
    with pytest.raises(ValueError, match="adapter output"):
        feature_pca.pca_project(teacher, teacher[:, :16], valid)
    # against a plain SVD of the valid cells: same subspace
    cells = teacher.permute(0, 2, 3, 1)[valid].double()
    _, _, vh = torch.linalg.svd(cells - cells.mean(0), full_matrices=False)
    _, basis = feature_pca.pca_basis(teacher, valid)
    assert torch.allclose((vh[:3] @ basis).abs(), torch.eye(3, dtype=torch.float64), atol=1e-6)

    maps_t = {"sam/image_embeddings@P4": teacher, "dino/x@P5": teacher[:, :8, :4, :4]}
    path = feature_pca.pca_panel(tmp_path / "pca.png", maps_t, {"sam/image_embeddings@P4": teacher.clone()},
                                 images=batch.images, valid={"sam/image_embeddings@P4": valid},
                                 image_ids=batch.image_ids,
                                 max_images=2)
    png = read(path)
    assert (png.shape[1], png.shape[0]) == vis_canvas.panel_size(2, 1 + 2 * 2)
    for i in range(2):
        assert np.array_equal(cell(png, i, 1), cell(png, i, 2))  # same projection, same image
        assert cell(png, i, 1).std() > 10
        assert message(cell(png, i, 4))  # "no student map"
    moved = feature_pca.pca_panel(tmp_path / "pca2.png", maps_t, {"sam/image_embeddings@P4": teacher.roll(2, -1)},
                                  images=batch.images, valid={"sam/image_embeddings@P4": valid}, max_images=2)
    assert not np.array_equal(cell(read(moved), 0, 1), cell(read(moved), 0, 2))


def test_write_test_results_lists_every_metric_and_class(tmp_path):
    metrics = {
        "images": 4, "mIoU": 0.41234, "pixel_accuracy": torch.tensor(0.8), "hd95": float("nan"),
        "per_class_iou": {"person": 0.5, "car": np.float32(0.25), "dog": None},
        "per_class": {"person": {"P": 0.9, "R": 0.8, "mAP50": 0.7}, "car": {"P": 0.1, "R": 0.2, "mAP50": 0.3}},
        "heads": {"seg": {"dice": 0.6}, "det": {"mAP50": 0.1, "per_class": {"person": 0.2}}},
        "fidelity": {},  # nothing to list: no empty table
    }
    path = results_text.write_test_results(tmp_path / "test_results.txt", metrics, header={"checkpoint": "best.pt"})
    text = path.read_text()
    assert "checkpoint: best.pt" in text
    for line in ("mIoU            0.4123", "pixel_accuracy  0.8000", "hd95            nan", "images          4"):
        assert line in text, text
    lines = text.splitlines()
    assert any(line.split() == ["person", "0.5000"] for line in lines)
    assert any(line.split() == ["dog", "-"] for line in lines)
    assert any(line.split() == ["name", "P", "R", "mAP50"] for line in lines)
    assert any(line.split() == ["car", "0.1000", "0.2000", "0.3000"] for line in lines)
    assert "[heads/det]" in text and any(line.split() == ["person", "0.2000"] for line in lines)
    assert "[fidelity]" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["test_results.txt"]


def test_loggers_tensorboard_events_and_wandb_errors(batch, tmp_path, monkeypatch):
    panel = prediction_panel.render_panel(tmp_path / "p.png", batch.images,
                                          [PanelRow("bin", Prediction.binary(torch.rand(4, 8, 8)))], max_images=1)
    with RunLoggers(tmp_path / "run", ["tensorboard"], project="t", config={"a": 1}) as lg:
        lg.add_scalar("train/loss", 1.5, 1)
        lg.add_image("vis/epoch", panel, 1)
        lg.add_image("vis/array", np.zeros((8, 8, 3), np.uint8), 1)
    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000  # the PNG went in
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert acc.Scalars("train/loss")[0].value == 1.5 and {"vis/epoch", "vis/array"} <= set(acc.Tags()["images"])

    with pytest.raises(ConfigError, match="valid: tensorboard, wandb.*Did you mean 'tensorboard'"):
        RunLoggers(tmp_path / "x", ["tensorbord"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # wandb is not installed here either way
    with pytest.raises(ConfigError, match=r"pip install wandb.*remove 'wandb' from train.loggers"):
        RunLoggers(tmp_path / "y", ["tensorboard", "wandb"])
    assert not (tmp_path / "y").exists(), "nothing written before the error"


def test_wandb_gets_one_step_metric_per_prefix(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # find_spec() sees a module already imported
    fake.init = lambda **kw: calls.append(("init", kw)) or "run"
    fake.define_metric = lambda name, **kw: calls.append(("define", name, kw.get("step_metric")))
    fake.log = lambda d: calls.append(("log", d))
    fake.Image = lambda arr: ("image", arr.shape)
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    check_loggers(["wandb"])
    lg = RunLoggers(tmp_path / "run", ["wandb"], project="p", config={"lr": 0.1})
    lg.add_scalar("train/loss", 2.0, 10)
    lg.add_scalar("val/mAP50", 0.5, 1)
    lg.add_scalar("train/lr", 0.1, 11)
    lg.add_image("vis/epoch", np.zeros((4, 4, 3), np.uint8), 1)
    lg.close()
    assert calls[0] == ("init", {"project": "p", "name": "run", "dir": str(tmp_path / "run"), "config": {"lr": 0.1}})
    assert ("define", "train/*", "train/step") in calls and ("define", "val/*", "val/step") in calls
    assert ("log", {"train/loss": 2.0, "train/step": 10}) in calls
    assert ("log", {"val/mAP50": 0.5, "val/step": 1}) in calls
    assert sum(c[0] == "define" for c in calls) == 6 and calls[-1] == ("finish",)
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))  # tensorboard not asked for
