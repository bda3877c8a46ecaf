"""Issue 12, evaluation and use of a promptable (``sam_decoder``) student: the box-prompted scorer
against hand-computed IoUs (a stub head decodes known masks), ``tools/predict.py`` on a real
coco128 image, and the two-file ONNX export checked against PyTorch."""
from __future__ import annotations

import pytest
import torch

from vfmkd.datasets.records import Batch, BatchViews, DetectionBatch, InstanceBatch, ViewGeometry
from vfmkd.distillation.targets import MaskLogits, TeacherTargets
from vfmkd.engine.evaluator import PRIMARY_METRIC, build_scorers, primary_metric
from vfmkd.engine.promptable_metrics import PromptableScorer
from vfmkd.models.unified_model import StudentOutput

S = 32  # canvas; masks and decoder logits on the S/4 = 8 grid


def _identity_view() -> ViewGeometry:
    return ViewGeometry(matrix=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], affine=(1.0, 1.0, 0.0, 0.0), content_box=(0, 0, S, S),
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
                 boxes=DetectionBatch(torch.tensor([[0.0], [1.0]]), boxes, torch.tensor([0.0, 0.0]), torch.tensor([0, 1])),
                 instances=inst)


def _teacher() -> TeacherTargets:
    """A teacher mask for label row 0 only: 2 cells inside the student's 6 -> alignment IoU 2/6."""
    logits = (_cells(0, 2, 0, 1) * 10 - 5)[None]
    eye = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)
    return TeacherTargets(features={}, affine=eye, valid_hw=torch.tensor([[S, S]] * 2), input_size=S, student_affine=eye,
                          mask_logits=MaskLogits(logits=logits, batch_idx=torch.tensor([0]), label_index=torch.tensor([0]),
                                                 cls=torch.tensor([0])))


def test_promptable_scorer_by_hand():
    scorer = PromptableScorer({0: "person", 1: "car"}, module=StubHead())
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
    assert (head, metric) == ("promptable", PRIMARY_METRIC["promptable"][0]) and tag.startswith("boxmIoU")
    assert value == pytest.approx(r["mIoU"]) == pytest.approx(fitness)
