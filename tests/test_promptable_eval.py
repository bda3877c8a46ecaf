"""Issue 12, evaluation and use of a promptable (``sam_decoder``) student: the box-prompted scorer
against hand-computed IoUs (a stub head decodes known masks), ``tools/predict.py`` on a real
coco128 image, and the two-file ONNX export checked against PyTorch."""
from __future__ import annotations

import pytest
import torch

from vfmkd.datasets.records import Batch, BatchViews, DetectionBatch, InstanceBatch, ViewGeometry
from vfmkd.distillation.pairing.mask_grid import prompts_on_grid
from vfmkd.distillation.targets import MaskLogits, TeacherTargets
from vfmkd.engine.evaluation.evaluator import build_scorers, primary_metric
from vfmkd.models.unified_model import StudentOutput
from vfmkd.tasks import get_task
from vfmkd.tasks.scoring.promptable_metrics import PromptableScorer

S = 32  # canvas; masks and decoder logits on the S/4 = 8 grid


def _identity_view() -> ViewGeometry:
    return ViewGeometry(matrix=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], affine=(1.0, 1.0, 0.0, 0.0),
                        content_box=(0, 0, S, S),
                        orig_hw=(S, S))


def _cells(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    m = torch.zeros(8, 8)
    m[r0:r1, c0:c1] = 1
    return m


def _cxcywh(b):
    x1, y1, x2, y2 = b
    return [(x1 + x2) / 2 / S, (y1 + y2) / 2 / S, (x2 - x1) / S, (y2 - y1) / S]


GT_A, GT_B = _cells(0, 2, 0, 2), _cells(4, 8, 4, 6)          # 4 and 8 cells
PRED_A, PRED_B = _cells(0, 2, 0, 3), _cells(4, 8, 4, 6)      # A: 6 cells (IoU 4/6), B: exact (IoU 1)
BOX_A, BOX_B = (0, 0, 8, 8), (16, 16, 24, 32)                # canvas px xyxy


class StubHead:
    """decode() -> the known mask of each box (looked up by x1) as +-5 logits, iou_pred per box."""

    table = {0: (PRED_A, 0.9), 16: (PRED_B, 0.8)}

    def decode(self, embeddings, batch_idx, boxes=None, points=None, point_labels=None, mask_input=None,
               multimask_output=False):
        hits = [self.table[int(round(float(b[0])))] for b in boxes]
        return torch.stack([(m * 10 - 5)[None] for m, _ in hits]), torch.tensor([[s] for _, s in hits])


def _batch() -> Batch:
    boxes = torch.tensor([_cxcywh(BOX_A), _cxcywh(BOX_B)])
    inst = InstanceBatch(cls=torch.tensor([[0.0], [1.0]]), bboxes=boxes, batch_idx=torch.tensor([0.0, 0.0]),
                         masks=torch.stack([GT_A, GT_B]), label_index=torch.tensor([0, 1]),
                         labelled=torch.tensor([True, False]))
    return Batch(images=torch.zeros(2, 3, S, S), image_ids=["a", "b"], views=BatchViews.stack([_identity_view()] * 2),
                 boxes=DetectionBatch(torch.tensor([[0.0], [1.0]]), boxes, torch.tensor([0.0, 0.0]),
                                      torch.tensor([0, 1])),
                 instances=inst)


def _teacher() -> TeacherTargets:
    """A teacher mask for label row 0 only: 2 cells inside the student's 6 -> alignment IoU 2/6."""
    logits = (_cells(0, 2, 0, 1) * 10 - 5)[None]
    eye = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)
    return TeacherTargets(features={}, affine=eye, valid_hw=torch.tensor([[S, S]] * 2), input_size=S,
                          student_affine=eye,
                          mask_logits=MaskLogits(logits=logits, batch_idx=torch.tensor([0]),
                                                 label_index=torch.tensor([0]),
                                                 cls=torch.tensor([0])))


def test_promptable_scorer_by_hand():
    scorer = PromptableScorer({0: "person", 1: "car"}, module=StubHead(), teacher_prompts=prompts_on_grid,
                              read_output=get_task("promptable").read_output)
    out = StudentOutput({}, {}, {"promptable": torch.zeros(2, 256, 2, 2)})
    scorer.update(out, _batch(), {"sam": _teacher()})
    r = scorer.result()
    assert r["mIoU"] == pytest.approx((4 / 6 + 1.0) / 2)
    assert r["per_class_iou"] == pytest.approx({"person": 4 / 6, "car": 1.0})
    assert r["teacher_mIoU"] == pytest.approx(2 / 6) and r["teacher_instances"] == 1
    # one prediction per prompt: A is a true positive at IoU 0.50..0.65 (4 of 10 thresholds), B at all;
    # ultralytics' 101-point AP of a perfect class is 0.995
    assert r["mask_mAP50"] == pytest.approx(0.995)
    assert r["mask_mAP50-95"] == pytest.approx((0.4 * 0.995 + 0.995) / 2)
    assert (r["images"], r["skipped"], r["instances"]) == (1, 1, 2)


def test_promptable_scorer_without_teacher_masks_and_primary_metric():
    scorer = build_scorers({"promptable": "promptable"}, {0: "person", 1: "car"}, None)["promptable"]
    assert isinstance(scorer, PromptableScorer) and scorer.wants_targets

    class Model:
        heads = {"promptable": StubHead()}

    scorer.bind(Model())
    scorer.update(StudentOutput({}, {}, {"promptable": torch.zeros(2, 256, 2, 2)}), _batch(), {})
    r = scorer.result()
    assert r["teacher_mIoU"] != r["teacher_mIoU"]  # NaN: no teacher masks
    head, metric, value, fitness, tag = primary_metric({"promptable": r, "detection": {"mAP50": 0.1, "mAP50-95": 0.2}},
                                                       {"detection": "detection", "promptable": "promptable"})
    assert (head, metric) == ("promptable", get_task("promptable").primary_metric[0]) and tag.startswith("boxmIoU")
    assert value == pytest.approx(r["mIoU"]) == pytest.approx(fitness)


# ------------------------------------------------------------------ predict.py and export on a tiny student
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vfmkd.core.config import experiment_from_dict  # noqa: E402
from vfmkd.engine.builders import build_model  # noqa: E402
from vfmkd.utils.checkpoint import save_checkpoint  # noqa: E402
from vfmkd.utils.cli import run_tool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "datasets/coco128/images/train2017/000000000009.jpg"  # 640 x 480


def _run_config(heads: dict) -> dict:
    return experiment_from_dict({
        "experiment_name": "promptable_run",
        "model": {"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                  "heads": heads},
        "data": {"dataset": "coco128", "root": str(REPO / "datasets/coco128"), "img_size": 128},
    })


def _write_run(path: Path, heads: dict) -> Path:
    """``checkpoints/best.pt`` in the trainer's layout (no config.yaml beside it: the stored config is used)."""
    cfg = _run_config(heads)
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": model.state_dict(), "distiller": {}, "teacher_stats": {}, "optimizer": {},
                           "scheduler": {}, "epoch": 1, "config": cfg, "metrics": {},
                           "resume": {"epoch": 2, "batch": 0}})
    return path


@pytest.fixture(scope="module")
def promptable_ckpt(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("run") / "checkpoints" / "best.pt",
                      {"promptable": {"type": "sam_decoder"}})


def test_predict_writes_mask_and_overlay_at_the_original_size(promptable_ckpt, tmp_path):
    from vfmkd.engine.commands import predict

    out = tmp_path / "pred"
    assert run_tool(predict.main, ["--checkpoint", str(promptable_ckpt), "--image", str(IMAGE),
                                           "--box", "10", "20", "300", "400", "--point", "100", "150",
                                           "--output", str(out)]) == 0
    mask, over = Image.open(out / f"{IMAGE.stem}_mask.png"), Image.open(out / f"{IMAGE.stem}_overlay.png")
    assert mask.size == over.size == Image.open(IMAGE).size == (640, 480)
    assert mask.mode == "L" and set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


def test_predict_refuses_prompts_outside_the_image_and_heads_that_cannot_be_prompted(promptable_ckpt, tmp_path, caplog):
    from vfmkd.engine.commands import predict

    args = ["--checkpoint", str(promptable_ckpt), "--image", str(IMAGE), "--output", str(tmp_path)]
    assert run_tool(predict.main, args + ["--box", "10", "20", "700", "400"]) == 2
    assert "640 x 480" in caplog.text
    assert run_tool(predict.main, args + ["--point", "5", "-3"]) == 2
    detector = _write_run(tmp_path / "det" / "checkpoints" / "best.pt",
                          {"detection": {"type": "yolo_head", "num_classes": 80}})
    caplog.clear()
    assert run_tool(predict.main, ["--checkpoint", str(detector), "--image", str(IMAGE), "--box", "1", "2", "30", "40",
                                           "--output", str(tmp_path)]) == 2
    assert "no sam_decoder" in caplog.text and "detection (yolo_head)" in caplog.text
    assert not list(tmp_path.glob("*.png"))


def test_export_promptable_onnx_writes_encoder_and_decoder_that_match_pytorch(promptable_ckpt, tmp_path):
    import onnxruntime as ort

    from vfmkd.engine.commands import export
    from vfmkd.engine.export.exporter import load_student
    from vfmkd.engine.export.promptable import box_prompt, point_prompt

    out = tmp_path / "best.onnx"
    assert run_tool(export.main, [str(promptable_ckpt), "--format", "onnx", "--output", str(out)]) == 0
    enc, dec = tmp_path / "best.encoder.onnx", tmp_path / "best.decoder.onnx"
    assert enc.is_file() and dec.is_file() and not out.exists()
    model = load_student(promptable_ckpt, torch.load(promptable_ckpt, weights_only=True)["config"], "stored")
    head = model.heads["promptable"]
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        emb = head(model.neck(model.backbone(image)))
        boxes = torch.tensor([[8.0, 10.0, 90.0, 100.0], [50.0, 4.0, 120.0, 60.0], [0.0, 0.0, 128.0, 128.0]])
        points = torch.tensor([[[30.0, 40.0], [70.0, 90.0], [100.0, 20.0]]])
        want = [head.decode(emb, torch.zeros(3, dtype=torch.long), boxes=boxes),
                head.decode(emb, torch.zeros(1, dtype=torch.long), points=points)]
    got_emb = ort.InferenceSession(str(enc), providers=["CPUExecutionProvider"]).run(None, {"images": image.numpy()})[0]
    assert np.abs(got_emb - emb.numpy()).max() < 1e-3
    session = ort.InferenceSession(str(dec), providers=["CPUExecutionProvider"])
    for (coords, labels), (w_masks, w_iou) in zip((box_prompt(boxes), point_prompt(points)), want):
        masks, iou = session.run(None, {"image_embeddings": emb.numpy(), "point_coords": coords.numpy(),
                                        "point_labels": labels.numpy()})
        assert masks.shape == (len(coords), 1, 32, 32)
        assert np.abs(masks - w_masks.numpy()).max() < 1e-3 * max(1.0, float(w_masks.abs().max()))
        assert np.abs(iou - w_iou.numpy()).max() < 1e-4


def test_epoch_visualizer_draws_a_promptable_row(tmp_path):
    from vfmkd.engine.pictures.epoch_vis import EpochVisualizer

    class Model:
        heads = {"promptable": StubHead()}

    vis = EpochVisualizer(tmp_path, "epoch", 1, {"promptable": "promptable"}, None, {0: "person", 1: "car"}, None)
    vis.bind(Model())
    batch = _batch()
    out = StudentOutput({}, {}, {"promptable": torch.zeros(2, 256, 2, 2)})
    rows = vis.rows(out, batch, {"sam": _teacher()})
    assert len(rows) == 1 and rows[0].teacher is not None and rows[0].target is not None
    assert rows[0].student.masks[0].shape == (2, 8, 8)
    vis.on_batch(0, out, batch, {"sam": _teacher()})
    assert vis.written and vis.written[0].is_file()
