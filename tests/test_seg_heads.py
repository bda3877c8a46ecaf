"""Segmentation heads and their task losses beyond the shape/formula contracts
(tests/test_model_contracts.py, tests/test_loss_contract.py): the anchor rule behind
``instance_mask_logits``, the instance loss counting labelled images only, empty-label batches,
and the binary head reusing the semantic fusion."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import vfmkd.distillation.losses  # noqa: F401  (registers the losses)
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS, LOSSES
from vfmkd.datasets.records import Batch, BatchViews, DetectionBatch, InstanceBatch, ViewGeometry
from vfmkd.models.heads import BinaryHead, FPNFusion, SemanticHead, YOLOv8DetectHead, YOLOv8SegmentHead

SPECS = [FeatureSpec("P3", 8, 8), FeatureSpec("P4", 16, 16), FeatureSpec("P5", 32, 32)]
S = 64  # P3 8x8 (anchors 0..63), P4 4x4 (64..79), P5 2x2 (80..83); proto 16x16


def make_batch(n: int, **fields) -> Batch:
    view = ViewGeometry(matrix=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], affine=(1.0, 1.0, 0.0, 0.0),
                        content_box=(0, 0, S, S), orig_hw=(S, S))
    boxes = DetectionBatch(torch.zeros(0, 1), torch.zeros(0, 4), torch.zeros(0))
    return Batch(images=torch.zeros(n, 3, S, S), image_ids=[f"im{i}" for i in range(n)],
                 views=BatchViews.stack([view] * n), boxes=boxes, **fields)


def feats(n: int = 2, requires_grad: bool = False):
    return {s.name: torch.randn(n, s.channels, S // s.stride, S // s.stride,
                                requires_grad=requires_grad) for s in SPECS}


def seg_head(**kw) -> YOLOv8SegmentHead:
    return YOLOv8SegmentHead(SPECS, num_classes=3, num_masks=4, num_protos=8, **kw)


def anchor_centre(a: int):
    """(x, y) centre in pixels of anchor ``a`` of the 64x64 layout above."""
    for start, cells, stride in ((0, 8, 8), (64, 4, 16), (80, 2, 32)):
        if a < start + cells * cells:
            k = a - start
            return ((k % cells) + 0.5) * stride, ((k // cells) + 0.5) * stride
    raise IndexError(a)


# ----------------------------------------------------------------------------- anchor rule
def hand_output(head: YOLOv8SegmentHead):
    torch.manual_seed(0)
    head.train()
    out = head(feats())
    scores = torch.full_like(out["scores"], -5.0)
    # image 0: class 1 scores high at P3 cell (2, 2) [anchor 18, centre (20, 20)] and P4 cell (1, 1)
    # [anchor 69, centre (24, 24)]; class 0 high at anchor 9 [centre (12, 12)]. Image 1: class 1 high
    # at anchor 27 [centre (28, 28)].
    scores[0, 1, 18], scores[0, 1, 69], scores[0, 0, 9], scores[1, 1, 27] = 3.0, 4.0, 2.0, 1.0
    out["scores"] = scores
    return out


def test_anchor_rule_highest_class_score_inside_the_box_else_nearest_centre():
    head = seg_head()
    out = hand_output(head)
    centres = {18: (20, 20), 69: (24, 24), 9: (12, 12), 27: (28, 28), 4: (36, 4)}
    assert {a: anchor_centre(a) for a in centres} == centres
    boxes = torch.tensor([
        [8.0, 8.0, 30.0, 30.0],   # image 0, class 1: anchors 18 and 69 both inside, 69 scores higher
        [8.0, 8.0, 22.0, 22.0],   # image 0, class 1: only 18 of the two inside -> 18
        [8.0, 8.0, 30.0, 30.0],   # image 0, class 0: anchor 9 is its best inside
        [8.0, 8.0, 30.0, 30.0],   # image 1, class 1: its own scores -> 27
        [13.0, 13.0, 15.0, 15.0],  # image 0, class 1: no centre inside (2 px box) -> nearest to (14, 14) = 9
        [33.0, 1.0, 38.0, 6.0],   # image 1, class 2 (all scores equal): the one centre inside, (36, 4) -> 4
    ])
    cls = torch.tensor([1, 1, 0, 1, 1, 2])
    batch_idx = torch.tensor([0, 0, 0, 1, 0, 1])
    assert head.match_anchors(out, boxes, cls, batch_idx).tolist() == [69, 18, 9, 27, 9, 4]
    # the eval tuple carries the same raw dict
    assert head.match_anchors(((None, None), out), boxes, cls, batch_idx).tolist() == [69, 18, 9, 27, 9, 4]
    assert head.match_anchors(out, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0)).shape == (0,)


def test_instance_mask_logits_are_the_matched_coefficients_times_the_prototypes():
    head = seg_head()
    out = hand_output(head)
    boxes, cls, batch_idx = torch.tensor([[8.0, 8.0, 30.0, 30.0]] * 2), torch.tensor([1, 1]), torch.tensor([0, 1])
    logits = head.instance_mask_logits(out, boxes, cls, batch_idx)
    assert logits.shape == (2, S // 4, S // 4)
    coef, proto = out["mask_coefficient"], out["proto"]
    for n, (b, a) in enumerate(((0, 69), (1, 27))):
        by_hand = sum(coef[b, m, a] * proto[b, m] for m in range(head.num_masks))
        torch.testing.assert_close(logits[n], by_hand, rtol=1e-5, atol=1e-5)
    logits.sum().backward()  # differentiable: mask_distill trains coefficients and prototypes
    assert head.detect.cv4[1][2].weight.grad is not None and head.detect.proto.cv3.conv.weight.grad is not None


# ----------------------------------------------------------------------------- instance loss
SOURCE_CLS = torch.tensor([[0.0], [2.0], [1.0]])
SOURCE_BOXES = torch.tensor([[0.3, 0.3, 0.25, 0.25], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
SOURCE_IMAGE = [0, 0, 1]  # source image 0 has two instances, source image 1 one


def instances(labelled, sources=(0, 1)) -> InstanceBatch:
    """Batch slot i shows source image ``sources[i]``; the rows of its instances are present when
    ``labelled[i]`` (masks fill the boxes on the 16x16 grid)."""
    rows, idx = [], []
    for slot, (src, lab) in enumerate(zip(sources, labelled)):
        if lab:
            found = [n for n, im in enumerate(SOURCE_IMAGE) if im == src]
            rows += found
            idx += [float(slot)] * len(found)
    masks = torch.zeros(len(rows), 16, 16)
    for k, n in enumerate(rows):
        cx, cy, w, h = SOURCE_BOXES[n].tolist()
        masks[k, round((cy - h / 2) * 16):round((cy + h / 2) * 16),
              round((cx - w / 2) * 16):round((cx + w / 2) * 16)] = 1
    rows_t = torch.tensor(rows, dtype=torch.long)
    return InstanceBatch(cls=SOURCE_CLS[rows_t], bboxes=SOURCE_BOXES[rows_t], batch_idx=torch.tensor(idx).view(-1),
                         masks=masks, label_index=rows_t, labelled=torch.tensor(labelled))


def image_of(out, i: int):
    """The head's training dict for batch item ``i`` alone."""
    return {k: (v[i:i + 1] if torch.is_tensor(v) else [t[i:i + 1] for t in v]) for k, v in out.items()}


def test_instance_loss_counts_labelled_images_only():
    torch.manual_seed(0)
    head = seg_head().train()
    loss = LOSSES.build("instance_segmentation", head=head)
    with torch.no_grad():
        out = head(feats())  # once: BatchNorm statistics must not differ between the calls compared
    # image 1 unlabelled: the loss equals the loss of image 0 alone
    value, items = loss(out, make_batch(2, instances=instances([True, False])))
    alone, alone_items = loss(image_of(out, 0), make_batch(1, instances=instances([True], (0,))))
    assert float(value.detach()) == pytest.approx(float(alone), rel=1e-5)
    assert {k: float(v) for k, v in items.items()} == pytest.approx(
        {k: float(v) for k, v in alone_items.items()}, rel=1e-5
    )
    # image 0 unlabelled: the rows of image 1 are re-indexed to position 0
    value1, _ = loss(out, make_batch(2, instances=instances([False, True])))
    alone1, _ = loss(image_of(out, 1), make_batch(1, instances=instances([True], (1,))))
    assert float(value1) == pytest.approx(float(alone1), rel=1e-5)


def test_instance_loss_without_labelled_images_is_a_connected_zero():
    head = seg_head().train()
    loss = LOSSES.build("instance_segmentation", head=head)
    f = feats(requires_grad=True)
    value, items = loss(head(f), make_batch(2, instances=instances([False, False])))
    assert float(value.detach()) == 0.0 and set(items) == {"box", "seg", "cls", "dfl"}
    value.backward()
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters() if p.requires_grad)


def test_task_losses_name_the_missing_targets():
    head = seg_head()
    with pytest.raises(ValueError, match="instances=True"):
        LOSSES.build("instance_segmentation", head=head)(head.train()(feats()), make_batch(2))
    with pytest.raises(ValueError, match="semantic=True"):
        LOSSES.build("semantic_segmentation", head=SemanticHead(SPECS, num_classes=3))(
            torch.zeros(2, 3, 8, 8), make_batch(2)
        )
    with pytest.raises(ValueError, match="binary_classes"):
        LOSSES.build("binary_segmentation", head=BinaryHead(SPECS))(torch.zeros(2, 1, 8, 8), make_batch(2))
    with pytest.raises(ValueError, match="yolo_seg_head"):
        LOSSES.build("instance_segmentation", head=SemanticHead(SPECS, num_classes=3))


def test_detection_loss_reads_the_batch_boxes():
    torch.manual_seed(0)
    head = YOLOv8DetectHead(SPECS, num_classes=3).train()
    boxes = DetectionBatch(torch.tensor([[1.0]]), torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.zeros(1))
    value, items = LOSSES.build("detection", head=head)(head(feats(1)), replace(make_batch(1), boxes=boxes))
    assert set(items) == {"box", "cls", "dfl"} and float(value.detach()) > 0


@pytest.mark.parametrize("name, channels, field, fill", [
    ("semantic_segmentation", 3, "semantic", 0), ("binary_segmentation", 1, "binary", 255)])
def test_pixel_losses_without_labelled_pixels_are_a_connected_zero(name, channels, field, fill):
    logits = torch.randn(2, channels, 8, 8, requires_grad=True)
    target = torch.full((2, S, S), fill, dtype=torch.int64 if field == "semantic" else torch.uint8)
    head = SemanticHead(SPECS, num_classes=3) if channels == 3 else BinaryHead(SPECS)
    value, items = LOSSES.build(name, head=head)(logits, make_batch(2, **{field: target}))
    assert float(value.detach()) == 0.0 and all(float(v) == 0.0 for v in items.values())
    value.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_pixel_losses_upsample_to_the_target_and_train_the_head():
    torch.manual_seed(0)
    head = HEADS.build("semantic_head", in_specs=SPECS, num_classes=4, channels=8).train()
    target = torch.randint(0, 4, (2, S, S))
    value, items = LOSSES.build("semantic_segmentation", head=head)(head(feats()), make_batch(2, semantic=target))
    value.backward()
    assert set(items) == {"ce", "dice"} and float(value.detach()) > 0
    assert all(p.grad is not None for p in head.parameters())
    binary = HEADS.build("binary_head", in_specs=SPECS, channels=8, output_stride=4).train()
    target = torch.randint(0, 2, (2, S, S), dtype=torch.uint8)
    value, items = LOSSES.build("binary_segmentation", head=binary)(binary(feats()), make_batch(2, binary=target))
    value.backward()
    assert set(items) == {"bce", "dice"} and all(p.grad is not None for p in binary.parameters())


# ----------------------------------------------------------------------------- heads
def test_binary_head_is_the_semantic_head_with_one_output():
    head = BinaryHead(SPECS, channels=8)
    assert isinstance(head, SemanticHead) and isinstance(head.fusion, FPNFusion)
    assert head.num_classes == 1 and head.task == "binary" and SemanticHead.task == "semantic"
    assert head(feats()).shape == (2, 1, S // 8, S // 8)
    assert SemanticHead(SPECS, num_classes=5, output_stride=4)(feats()).shape == (2, 5, S // 4, S // 4)
    with pytest.raises(ValueError, match="output_stride"):
        SemanticHead(SPECS, num_classes=5, output_stride=16)
    with pytest.raises(Exception, match="num_classes"):
        HEADS.build("binary_head", in_specs=SPECS, num_classes=2)


def test_every_head_declares_its_task():
    import vfmkd.models  # noqa: F401
    tasks = {n: HEADS.get(n).task for n in ("yolo_head", "yolo_seg_head", "semantic_head", "binary_head")}
    assert tasks == {"yolo_head": "detection", "yolo_seg_head": "instance", "semantic_head": "semantic",
                     "binary_head": "binary"}
