"""The segmentation scorers (vfmkd/tasks/scoring/seg_metrics.py) on tiny cases worked out by hand: the
libraries they delegate to (ultralytics, torchmetrics, MONAI) must give the numbers below, and the
letterbox must be undone before scoring."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vfmkd.datasets.records import Batch, BatchViews, DetectionBatch, InstanceBatch, ViewGeometry
from vfmkd.models.unified_model import StudentOutput
from vfmkd.tasks import get_task
from vfmkd.tasks.scoring.common import unletterbox
from vfmkd.tasks.scoring.seg_metrics import BinaryScorer, InstanceScorer, SemanticScorer

READ_SEMANTIC, READ_BINARY = get_task("semantic").read_output, get_task("binary").read_output


def letterbox(orig_hw, size: int) -> ViewGeometry:
    """The view a letterbox of an (h, w) image onto a size x size canvas makes (centred padding)."""
    h, w = orig_hw
    r = size / max(h, w)
    ox, oy = (size - w * r) / 2, (size - h * r) / 2
    return ViewGeometry(matrix=[[r, 0.0, ox], [0.0, r, oy]], affine=(r, r, ox, oy),
                        content_box=(int(ox), int(oy), int(ox + w * r), int(oy + h * r)), orig_hw=(h, w))


def batch_of(views, size: int, **fields) -> Batch:
    return Batch(images=torch.zeros(len(views), 3, size, size), image_ids=[f"im{i}" for i in range(len(views))],
                 views=BatchViews.stack(views),
                 boxes=DetectionBatch(torch.zeros(0, 1), torch.zeros(0, 4), torch.zeros(0)),
                 **fields)


def to_canvas(orig: torch.Tensor, view: ViewGeometry, size: int, pad: int) -> torch.Tensor:
    """An original-resolution label map letterboxed onto the canvas (each pixel an r x r block)."""
    x1, y1, x2, y2 = view.content_box
    canvas = torch.full((size, size), pad, dtype=orig.dtype)
    canvas[y1:y2, x1:x2] = orig.repeat_interleave((y2 - y1) // orig.shape[0], 0).repeat_interleave(
        (x2 - x1) // orig.shape[1], 1)
    return canvas


def output(head: str, value) -> StudentOutput:
    return StudentOutput(backbone={}, neck={}, heads={head: value})


def test_unletterbox_crops_the_content_and_resizes_nearest():
    view = letterbox((2, 4), 8)  # scale 2: content rows 2..6
    assert view.content_box == (0, 2, 8, 6)
    orig = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    canvas = to_canvas(orig, view, 8, pad=0)
    assert canvas[0].eq(0).all() and canvas[2, :2].eq(1).all() and canvas[5, 6:].eq(8).all()
    assert torch.equal(unletterbox(canvas, batch_of([view], 8), 0), orig)


# ----------------------------------------------------------------------------- semantic
NAMES = {0: "unlabeled", 1: "person", 2: "car", 3: "dog", 4: "cat"}
SEM_GT = torch.tensor([[1, 1, 2, 0], [3, 1, 2, 2]])  # original 2 x 4; (0, 3) unlabeled
SEM_PRED = torch.tensor([[1, 2, 2, 1], [3, 1, 0, 2]])
# labelled pixels: person 3 (2 right, 1 called car), car 3 (2 right, 1 called unlabeled), dog 1 (right);
# the prediction 1 at the unlabeled pixel is ignored. cat: absent from both -> not averaged.
# IoU person = 2 / (3 + 0 FP) = 2/3; car = 2 / (3 + 1 FP) = 1/2; dog = 1.
SEM_IOU = {"person": 2 / 3, "car": 1 / 2, "dog": 1.0}
SEM_ACC = 5 / 7


def test_semantic_scorer_by_hand():
    size = 8
    views = [letterbox((2, 4), size), letterbox((2, 4), size)]
    # image 1 unlabelled
    gt = torch.stack([to_canvas(SEM_GT, views[0], size, 0), torch.zeros(size, size, dtype=torch.long)])
    pred = torch.stack([to_canvas(SEM_PRED, views[0], size, 3), torch.full((size, size), 4)])  # padding predicted "dog"
    logits = F.one_hot(pred, 5).permute(0, 3, 1, 2).float() * 4.0  # (B, K, S, S), argmax = pred
    scorer = SemanticScorer(NAMES, read_output=READ_SEMANTIC)
    scorer.update(output("semantic", logits), batch_of(views, size, semantic=gt))
    result = scorer.result()
    assert result["per_class_iou"] == pytest.approx(SEM_IOU)
    assert result["mIoU"] == pytest.approx(sum(SEM_IOU.values()) / 3)
    assert result["pixel_accuracy"] == pytest.approx(SEM_ACC)
    assert result["images"] == 2


def test_semantic_scorer_upsamples_low_resolution_logits():
    size = 8
    view = letterbox((8, 8), size)
    logits = torch.zeros(1, 3, 1, 1)
    logits[0, 2] = 1.0  # class 2 everywhere after the bilinear resize
    gt = torch.full((1, size, size), 2, dtype=torch.long)
    gt[0, :, :2] = 1  # a quarter is class 1
    scorer = SemanticScorer({0: "unlabeled", 1: "a", 2: "b"}, read_output=READ_SEMANTIC)
    scorer.update(output("semantic", logits), batch_of([view], size, semantic=gt))
    result = scorer.result()
    assert result["per_class_iou"] == pytest.approx({"a": 0.0, "b": 0.75})
    assert result["mIoU"] == pytest.approx(0.375) and result["pixel_accuracy"] == pytest.approx(0.75)


# ----------------------------------------------------------------------------- binary
BIN_GT = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.uint8)  # original 3 x 4
BIN_PRED = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.uint8)
# TP 3, FP 1 (0, 3), FN 1 (1, 1): Dice 6 / 8, IoU 3 / 5. Image 2 (all background, predicted empty)
# adds 12 true negatives: accuracy (10 + 12) / 24.
# HD95: both masks are all boundary. Prediction -> GT distances (0, 0, 1, 0) and GT -> prediction
# (0, 0, 1, 0): numpy's linear 95th percentile of [0, 0, 0, 1] is 0.85 each way; symmetric -> 0.85.
BIN_HD95 = 0.85


def test_binary_scorer_by_hand():
    size = 8
    views = [letterbox((3, 4), size)] * 3  # scale 2: content rows 1..7
    gt = torch.stack([to_canvas(BIN_GT, views[0], size, 255),
                      to_canvas(torch.zeros(3, 4, dtype=torch.uint8), views[0], size, 255),
                      torch.full((size, size), 255, dtype=torch.uint8)])  # image 3: no binary mask
    pred = torch.stack([to_canvas(BIN_PRED, views[0], size, 1), torch.zeros(size, size, dtype=torch.uint8),
                        torch.ones(size, size, dtype=torch.uint8)])  # padding predicted foreground: cropped away
    logits = (pred.float() * 2 - 1).unsqueeze(1) * 3.0
    scorer = BinaryScorer(read_output=READ_BINARY)
    scorer.update(output("binary", logits), batch_of(views, size, binary=gt))
    result = scorer.result()
    assert result["dice"] == pytest.approx(0.75)
    assert result["iou"] == pytest.approx(0.6)
    assert result["pixel_accuracy"] == pytest.approx(22 / 24)
    assert result["hd95"] == pytest.approx(BIN_HD95)
    assert (result["hd95_images"], result["hd95_skipped_empty"], result["images"], result["unlabelled"]) == (1, 1, 2, 1)


def test_binary_hd95_is_in_original_pixels():
    """The same masks letterboxed at scale 4 instead of 2 give the same HD95: it is measured after
    undoing the letterbox, not on the canvas."""
    results = []
    for size in (8, 16):
        view = letterbox((3, 4), size)
        gt = to_canvas(BIN_GT, view, size, 255)[None]
        logits = (to_canvas(BIN_PRED, view, size, 0)[None].float() * 2 - 1).unsqueeze(1)
        scorer = BinaryScorer(read_output=READ_BINARY)
        scorer.update(output("binary", logits), batch_of([view], size, binary=gt))
        results.append(scorer.result()["hd95"])
    assert results == pytest.approx([BIN_HD95, BIN_HD95])


def test_binary_hd95_is_nan_when_every_image_is_skipped():
    view = letterbox((4, 4), 4)
    scorer = BinaryScorer(read_output=READ_BINARY)
    scorer.update(output("binary", torch.full((1, 1, 4, 4), -3.0)),
                  batch_of([view], 4, binary=torch.ones(1, 4, 4, dtype=torch.uint8)))
    result = scorer.result()
    assert math.isnan(result["hd95"]) and result["hd95_skipped_empty"] == 1 and result["dice"] == 0.0


# ----------------------------------------------------------------------------- instance
# One 64 x 64 image (identity view), two classes, one mask coefficient over a prototype of +1s:
# a predicted mask is its box on the 16 x 16 grid. GT 0: box (0, 0, 32, 32), mask = that box.
# GT 1: box (32, 32, 64, 64), mask = its left half. Prediction A (class 0, conf 0.9) = GT 0 exactly;
# prediction B (class 1, conf 0.8) = GT 1's box: box IoU 1, mask IoU 32 / 64 = 0.5 (a hit at 0.50 only).
# ultralytics' 101-point interpolated AP of a single perfect detection is 0.995 (its documented
# convention), so: box mAP50 = mAP50-95 = 0.995; mask mAP50 = 0.995; mask mAP50-95 =
# (0.995 [class 0] + 0.995 / 10 [class 1, one threshold of ten]) / 2.
PERFECT_AP = 0.995


def test_instance_scorer_by_hand():
    size, nc = 64, 2
    decoded = torch.zeros(2, 4 + nc + 1, 3)  # (B, xywh + classes + 1 coefficient, A = 3)
    decoded[0, :4, 0] = torch.tensor([16.0, 16.0, 32.0, 32.0])
    decoded[0, 4, 0] = 0.9
    decoded[0, :4, 1] = torch.tensor([48.0, 48.0, 32.0, 32.0])
    decoded[0, 5, 1] = 0.8
    decoded[:, 6] = 1.0
    decoded[1, :4, 2] = torch.tensor([16.0, 16.0, 8.0, 8.0])  # image 1 has no instance labels: skipped
    decoded[1, 4, 2] = 0.7
    proto = torch.ones(2, 1, 16, 16)
    masks = torch.zeros(2, 16, 16)
    masks[0, :8, :8] = 1
    masks[1, 8:, 8:12] = 1
    inst = InstanceBatch(cls=torch.tensor([[0.0], [1.0]]),
                         bboxes=torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]),
                         batch_idx=torch.zeros(2), masks=masks, label_index=torch.arange(2),
                         labelled=torch.tensor([True, False]))
    view = letterbox((64, 64), size)
    scorer = InstanceScorer({0: "a", 1: "b"}, conf=0.25, iou=0.7, max_det=10, head="instance",
                            read_output=get_task("instance").read_output)
    raw = ((decoded, proto), {"proto": proto, "mask_coefficient": decoded[:, 6:]})  # the eval layout of ultralytics
    scorer.update(output("instance", raw), batch_of([view, view], size, instances=inst))
    result = scorer.result()
    assert result["mAP50"] == pytest.approx(PERFECT_AP) and result["mAP50-95"] == pytest.approx(PERFECT_AP)
    assert result["mask_mAP50"] == pytest.approx(PERFECT_AP)
    assert result["mask_mAP50-95"] == pytest.approx((PERFECT_AP + PERFECT_AP / 10) / 2)
    assert result["precision"] == pytest.approx(1.0) and result["recall"] == pytest.approx(1.0)
    assert (result["images"], result["skipped"]) == (1, 1)
