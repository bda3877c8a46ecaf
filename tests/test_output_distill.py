"""Output distillation: pairing a student head's output with a teacher's outputs (issue 8, item 4).

Hand-computed pairings on tiny synthetic tensors (the teacher mask resampled through a known affine,
the union per class, weights inside the boxes), loss values against their formulas, gradients into
the head, the config errors, and one end-to-end pairing on real coco128 with a live random-init SAM.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.datasets.records import Batch, BatchViews, DetectionBatch, ViewGeometry
from vfmkd.distillation.distiller import Distiller, LossTerm
from vfmkd.distillation.losses import ClsDistillLoss, KLDivergenceLoss, MaskDistillLoss
from vfmkd.distillation.pairing.mask_grid import BACKGROUND_LOGIT, box_cells, class_union, masks_on_grid, match_rows
from vfmkd.distillation.pairing.mask_pairs import (
    binary_kl_pair,
    class_mask_pair,
    class_union_maps,
    image_class_pair,
    instance_mask_pair,
)
from vfmkd.distillation.pairing.output_pairs import OutputPairing, check_mask_sources
from vfmkd.distillation.pairing.output_rules import OutputRule, TeacherOutputs, resolve_output_term
from vfmkd.distillation.targets import MaskLogits, TeacherTargets
from vfmkd.engine.builders import build_loss_terms, build_model, output_class_channels
from vfmkd.models.heads.yolo_seg_head import YOLOv8SegmentHead
from vfmkd.models.unified_model import StudentOutput

S = 64  # student canvas
SPECS = [FeatureSpec("P3", 8, 8), FeatureSpec("P4", 16, 16), FeatureSpec("P5", 32, 32)]


def bern_kl(t: float, s: float, temp: float) -> float:
    """KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T))), written out."""
    pt, ps = 1 / (1 + math.exp(-t / temp)), 1 / (1 + math.exp(-s / temp))
    return pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))


def make_batch(boxes_px, cls, batch_idx, label_index, n_images=1, size=S, content=None) -> Batch:
    """A batch of plain letterbox views (identity affine) with the given canvas-pixel xyxy boxes."""
    b = torch.tensor(boxes_px, dtype=torch.float32).view(-1, 4)
    cxcywh = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1) / size
    view = ViewGeometry(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (1.0, 1.0, 0.0, 0.0), content or (0, 0, size, size),
                        (size, size))
    return Batch(images=torch.zeros(n_images, 3, size, size), image_ids=[f"im{i}" for i in range(n_images)],
                 views=BatchViews.stack([view] * n_images),
                 boxes=DetectionBatch(cls=torch.tensor(cls, dtype=torch.float32).view(-1, 1), bboxes=cxcywh,
                                      batch_idx=torch.tensor(batch_idx, dtype=torch.float32),
                                      label_index=torch.tensor(label_index, dtype=torch.int64)))


def live_targets(masks: MaskLogits, n_images: int, teacher_affine=(1.0, 1.0, 0.0, 0.0), input_size=S,
                 valid_hw=None) -> TeacherTargets:
    """Live-pass targets: reference frame = the student canvas (identity student affine)."""
    valid = valid_hw or (input_size, input_size)
    return TeacherTargets(features={}, affine=torch.tensor([teacher_affine] * n_images),
                          valid_hw=torch.tensor([valid] * n_images, dtype=torch.float32), input_size=input_size,
                          student_affine=torch.tensor([[1.0, 1.0, 0.0, 0.0]] * n_images), mask_logits=masks)


# ------------------------------------------------------------------------------------- geometry
def test_teacher_mask_lands_on_the_student_grid_through_the_affine():
    # Teacher canvas 64 = student canvas shifted: teacher px = student px + 8 (2 cells of stride 4),
    # valid teacher width 48: student cells whose centre maps to x_t >= 48 are invalid.
    mask = torch.full((1, 16, 16), -5.0)
    mask[0, 3:6, 6:9] = 5.0  # teacher cells rows 3-5, cols 6-8
    target = live_targets(None, 1, teacher_affine=(1.0, 1.0, 8.0, 0.0), valid_hw=(64.0, 48.0))
    out, valid = masks_on_grid(mask, torch.tensor([0]), target, target.student_affine, (16, 16), 4)
    expected = torch.full((16, 16), -5.0)
    expected[3:6, 4:7] = 5.0  # two cells left in x, same rows
    assert torch.equal(out[0, :, :14], expected[:, :14])  # (beyond the teacher canvas RoIAlign reads 0: masked below)
    # centre of student cell j: 4j + 2 -> teacher x 4j + 10 < 48  <=>  j <= 9
    assert valid[0, :, :10].eq(1).all() and valid[0, :, 10:].eq(0).all()


def test_downscaled_teacher_is_interpolated_linearly():
    # Teacher 32 px (mask 8x8) seeing the 64 px student canvas at half scale; a ramp along x is
    # reproduced exactly by RoIAlign's bilinear samples: student cell j samples mask x = (2j+1)/4 - 0.5.
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 8).expand(1, 8, 8).contiguous()
    target = live_targets(None, 1, teacher_affine=(0.5, 0.5, 0.0, 0.0), input_size=32)
    out, valid = masks_on_grid(ramp, torch.tensor([0]), target, target.student_affine, (16, 16), 4)
    j = torch.arange(16, dtype=torch.float32)
    expected = ((2 * j + 1) / 4 - 0.5).clamp(0, 7)
    assert torch.allclose(out[0, 5], expected) and valid.eq(1).all()


def test_box_cells_centre_rule_and_tiny_boxes():
    cells = box_cells(torch.tensor([[8.0, 4.0, 20.0, 12.0], [30.0, 30.0, 31.0, 31.0]]), (16, 16), 4)
    # box 0: centres 4j+2 in [8, 20) -> j = 2, 3, 4; rows 4i+2 in [4, 12) -> i = 1, 2
    assert cells[0].nonzero().tolist() == [[i, j] for i in (1, 2) for j in (2, 3, 4)]
    assert cells[1].nonzero().tolist() == [[7, 7]]  # no centre inside: the cell holding the box centre


def test_rows_match_by_image_and_label_index():
    ia, ib = match_rows(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 0, -1]),
                        torch.tensor([1, 0, 0, 0]), torch.tensor([0, 2, 0, 7]))
    assert ia.tolist() == [0, 1, 2] and ib.tolist() == [2, 1, 0]


def test_class_union_confines_each_mask_to_its_box():
    logits = torch.tensor([[[3.0, 3.0, -1.0]], [[-2.0, 1.0, 4.0]], [[9.0, 9.0, 9.0]]])  # (3, 1, 3)
    inside = torch.tensor([[[True, True, False]], [[False, True, True]], [[True, False, False]]])
    union, boxes = class_union(logits, inside, torch.tensor([0, 0, 1]), 2)
    assert union[0, 0].tolist() == [3.0, 3.0, 4.0]  # max of the two masks, each within its box
    assert union[1, 0].tolist() == [9.0, BACKGROUND_LOGIT, BACKGROUND_LOGIT]
    assert boxes[0, 0].tolist() == [True, True, True] and boxes[1, 0].tolist() == [True, False, False]


# ------------------------------------------------------------------------------------- pairings
def seg_head_and_output(seed=0):
    torch.manual_seed(seed)
    head = YOLOv8SegmentHead(SPECS, num_classes=3, num_masks=4, num_protos=8)
    feats = {s.name: torch.randn(1, s.channels, S // s.stride, S // s.stride) for s in SPECS}
    return head, head(feats)


def test_instance_pairs_follow_the_boxes_and_their_label_rows():
    head, output = seg_head_and_output()
    # Two boxes of the view, label rows 3 and 0; the teacher has masks for rows 0, 3 and 5 (row 5's
    # box was dropped by the augmentation) in another order.
    batch = make_batch([[4, 4, 28, 20], [32, 36, 60, 60]], [1, 2], [0, 0], [3, 0])
    tmask = torch.full((3, 16, 16), -3.0)
    tmask[0, 9:15, 8:15] = 6.0  # row 0: the second box
    tmask[1, 1:5, 1:7] = 4.0  # row 3: the first box
    masks = MaskLogits(tmask, torch.tensor([0, 0, 0]), torch.tensor([0, 3, 5]), torch.tensor([2, 1, 0]))
    student, teacher, weight = instance_mask_pair(head, output, batch, live_targets(masks, 1))
    assert student.shape == teacher.shape == weight.shape == (1, 2, 16, 16)
    assert torch.equal(teacher[0, 0], tmask[1]) and torch.equal(teacher[0, 1], tmask[0])
    boxes = torch.tensor([[4.0, 4, 28, 20], [32, 36, 60, 60]])
    assert torch.equal(weight[0].bool(), box_cells(boxes, (16, 16), 4))
    assert torch.allclose(student[0],
                          head.instance_mask_logits(output, boxes, torch.tensor([1, 2]), torch.tensor([0, 0])))


def test_semantic_union_per_class_and_binary_kl_value():
    # Image 0: two 'person' boxes (det class 0 -> semantic channel 1) and one 'car' (det 2 -> channel 3).
    batch = make_batch([[0, 0, 16, 16], [8, 8, 32, 24], [40, 40, 64, 64]], [0, 0, 2], [0, 0, 0], [0, 1, 2])
    tmask = torch.stack([torch.full((16, 16), v) for v in (2.0, 5.0, 7.0)])
    masks = MaskLogits(tmask, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]), torch.tensor([0, 0, 2]))
    target = live_targets(masks, 1)
    channels = torch.tensor([1, -1, 3])  # det class -> semantic channel
    logits = torch.randn(1, 5, 8, 8, requires_grad=True)  # stride 8 head
    student, teacher, weight = class_mask_pair(logits, batch, target, channels)
    assert student.shape == (1, 2, 8, 8)  # (image 0, person) and (image 0, car)
    assert torch.equal(student[0, 0], logits[0, 1]) and torch.equal(student[0, 1], logits[0, 3])
    boxes = box_cells(torch.tensor([[0.0, 0, 16, 16], [8, 8, 32, 24], [40, 40, 64, 64]]), (8, 8), 8)
    person = torch.where(boxes[1], 5.0, torch.where(boxes[0], 2.0, BACKGROUND_LOGIT))
    assert torch.equal(teacher[0, 0], person)  # union = max, each mask within its own box
    assert torch.equal(weight[0, 0].bool(), boxes[0] | boxes[1]) and torch.equal(weight[0, 1].bool(), boxes[2])
    # mask_distill = T^2 x mean over weighted cells of the Bernoulli KL
    value = MaskDistillLoss(temperature=2.0)(student, teacher, weight)
    cells = (boxes[0] | boxes[1]).nonzero().tolist()
    by_hand = [bern_kl(person[i, j].item(), logits[0, 1, i, j].item(), 2.0) for i, j in cells]
    by_hand += [bern_kl(7.0, logits[0, 3, i, j].item(), 2.0) for i, j in boxes[2].nonzero().tolist()]
    assert value.item() == pytest.approx(4.0 * sum(by_hand) / len(by_hand), rel=1e-5)
    value.backward()
    assert logits.grad[0, 1].abs().sum() > 0 and logits.grad[0, 0].abs().sum() == 0  # only distilled channels

    # Binary head (person foreground): KL over the whole valid image, background floor outside the boxes.
    blogits = torch.randn(1, 1, 8, 8, requires_grad=True)
    s2, t2, w2 = binary_kl_pair(blogits, batch, live_targets(masks, 1, valid_hw=(64.0, 48.0)),
                                torch.tensor([0, -1, -1]))
    assert s2.shape == t2.shape == (64, 2) and torch.equal(t2[:, 1].view(8, 8), person)
    assert w2.view(8, 8)[:, :6].eq(1).all() and w2.view(8, 8)[:, 6:].eq(0).all()  # x centre 8j+4 < 48
    kl = KLDivergenceLoss(temperature=4.0)(s2, t2, w2)
    by_hand = [bern_kl(person[i, j].item(), blogits[0, 0, i, j].item(), 4.0) for i in range(8) for j in range(6)]
    assert kl.item() == pytest.approx(16.0 * sum(by_hand) / len(by_hand), rel=1e-5)


def test_pictures_draw_the_class_union_the_loss_distils():
    """The epoch/test pictures' teacher column for semantic and binary heads is the per-class union
    of the teacher's box masks (what kl_divergence/mask_distill compare), not every instance mask."""
    from vfmkd.engine.pictures.epoch_vis import EpochVisualizer

    # person (det 0) x2 and car (det 2) in image 0; nothing in image 1
    batch = make_batch([[0, 0, 16, 16], [8, 8, 32, 24], [40, 40, 64, 64]], [0, 0, 2], [0, 0, 0], [0, 1, 2], n_images=2)
    tmask = torch.stack([torch.full((16, 16), v) for v in (2.0, 5.0, 7.0)])
    masks = MaskLogits(tmask, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]), torch.tensor([0, 0, 2]))
    targets = {"sam": live_targets(masks, 2)}
    boxes = box_cells(torch.tensor([[0.0, 0, 16, 16], [8, 8, 32, 24], [40, 40, 64, 64]]), (8, 8), 8)
    maps = class_union_maps(torch.zeros(2, 5, 8, 8), batch, targets["sam"], torch.tensor([1, -1, 3]))
    assert torch.equal(maps[0, 1], torch.where(boxes[1], 5.0, torch.where(boxes[0], 2.0, BACKGROUND_LOGIT)))
    assert torch.equal(maps[0, 3], torch.where(boxes[2], 7.0, BACKGROUND_LOGIT))
    assert maps[1].eq(BACKGROUND_LOGIT).all() and maps[0, [0, 2, 4]].eq(BACKGROUND_LOGIT).all()

    def visualizer(head, task, channels):
        rule = OutputRule("kl_divergence" if task == "binary" else "mask_distill", task, "masks")
        term = LossTerm("kd", "output", 1.0, "loss_kd_" + head, KLDivergenceLoss(teacher="sam"), head,
                        OutputPairing(rule, None, channels))
        return EpochVisualizer(Path("."), "epoch", 1, {head: task}, Distiller([term]), {}, None)

    def teacher_column(head, task, channels, logits):
        """The teacher column of the head's picture row: the engine's class maps, the task's picture of them."""
        labels = {"binary": torch.zeros(2, 64, 64, dtype=torch.uint8), "semantic": torch.zeros(2, 64, 64).long()}
        drawn = replace(batch, **{task: labels[task]})
        out = StudentOutput({}, {}, {head: logits})
        return visualizer(head, task, channels).rows(out, drawn, targets)[0].teacher

    binary = teacher_column("fg", "binary", [0, -1, -1], torch.zeros(2, 1, 8, 8))
    assert binary.kind == "binary"
    assert torch.allclose(binary.probs[0], torch.sigmoid(maps[0, 1]))  # person only: the car is not foreground
    assert binary.probs[1].max() < 1e-3
    semantic = teacher_column("seg", "semantic", [1, -1, 3], torch.zeros(2, 5, 8, 8))
    want = torch.where(boxes[0] | boxes[1], 1, torch.where(boxes[2], 3, 0))
    assert semantic.kind == "semantic" and torch.equal(semantic.labels[0], want) and semantic.labels[1].eq(0).all()
    # no output term on the head -> no union (the visualizer falls back to the instance masks)
    assert visualizer("fg", "binary", [0, -1, -1])._teacher_class_maps("other", torch.zeros(2, 1, 8, 8),
                                                                       batch, targets) is None


def test_image_level_class_scores_from_masks():
    batch = make_batch([[0, 0, 16, 16]], [0], [0], [0], n_images=2)  # image 1 has no box
    masks = MaskLogits(torch.full((1, 16, 16), 3.0), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    logits = torch.randn(2, 4, 8, 8)
    s, t, _ = image_class_pair(logits, batch, live_targets(masks, 2), torch.tensor([1, -1, 2]), "sigmoid")
    # thing channels 1 and 2, per image: student = max over the image, teacher = max inside the box
    assert torch.allclose(s.view(2, 2), logits[:, 1:3].amax((2, 3)))
    assert t.view(2, 2).tolist() == [[3.0, BACKGROUND_LOGIT], [BACKGROUND_LOGIT, BACKGROUND_LOGIT]]


# ------------------------------------------------------------------------------------- distiller
def test_distiller_trains_the_head_and_logs_groups_and_teacher_sums():
    head, _ = seg_head_and_output()
    feats = {s.name: torch.randn(1, s.channels, S // s.stride, S // s.stride) for s in SPECS}
    out = StudentOutput({}, feats, {"instance": head(feats)})
    rule = OutputRule("mask_distill", "instance", "masks")
    term = LossTerm("mask_distill", "output", 2.0, "loss_mask_distill", MaskDistillLoss(1.0, teacher="sam"),
                    "instance", OutputPairing(rule, head))
    distiller = Distiller([term], beta=0.5)
    assert distiller.teachers_used() == ("sam",) and distiller.teachers_needing_masks() == ("sam",)
    batch = make_batch([[4, 4, 28, 20]], [1], [0], [0])
    masks = MaskLogits(torch.full((1, 16, 16), 4.0), torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
    result = distiller(out, batch, {"sam": live_targets(masks, 1)})
    value = result.logs["loss_mask_distill"]
    assert result.logs["loss_kd"] == pytest.approx(2.0 * value)
    assert result.logs["loss_distill_sam"] == pytest.approx(0.5 * 2.0 * value) == pytest.approx(result.logs["loss"])
    result.total.backward()
    assert head.detect.proto.cv1.conv.weight.grad.abs().sum() > 0  # the prototypes learn from the teacher's mask
    coef = [p.grad for p in head.detect.cv4.parameters() if p.grad is not None]
    assert sum(float(g.abs().sum()) for g in coef) > 0  # and the coefficient branch (of the matched anchor's level)
    # no teacher this step -> the term is skipped; a teacher without masks -> skipped too
    assert "loss_mask_distill" not in distiller(out, batch, {}).logs
    assert "loss_mask_distill" not in distiller(out, batch, {"sam": live_targets(None, 1)}).logs


def test_vfmkd_scores_pair_anchor_by_anchor_and_refuse_other_sizes():
    student = {"scores": torch.randn(2, 3, 10)}
    teacher = {"scores": torch.randn(2, 3, 10)}
    batch = make_batch([[0, 0, 8, 8]], [0], [0], [0], n_images=2)
    target = TeacherTargets({}, torch.ones(2, 4), torch.ones(2, 2), S, head_outputs={"det": teacher})
    pairing = OutputPairing(OutputRule("cls_distill", "detection", "heads", "det"), None)
    (s, t), kwargs = pairing.pair(student, batch, target)
    assert torch.equal(s, student["scores"]) and torch.equal(t, teacher["scores"])
    assert ClsDistillLoss()(s, t).item() == pytest.approx(
        sum(bern_kl(teacher["scores"][b, k, a].item(), student["scores"][b, k, a].item(), 1.0)
            for b in range(2) for k in range(3) for a in range(10)) / 20, rel=1e-5)
    target.head_outputs = {"det": {"scores": torch.randn(2, 3, 12)}}
    with pytest.raises(ValueError, match="img_size"):
        pairing.pair(student, batch, target)


def test_vfmkd_dense_heads_pair_cell_by_cell_over_the_image_content():
    torch.manual_seed(1)
    batch = make_batch([[0, 0, 8, 8]], [0], [0], [0], content=(0, 16, 64, 48))  # rows 16-48 hold the image
    student, teacher = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)  # teacher at stride 16: resized
    target = TeacherTargets({}, torch.ones(1, 4), torch.ones(1, 2), S, head_outputs={"sem": teacher})
    (s, t, w), _ = OutputPairing(OutputRule("kl_divergence", "semantic", "heads", "sem"), None).pair(
        student, batch, target
    )
    up = torch.nn.functional.interpolate(teacher, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(t, up.permute(0, 2, 3, 1).reshape(-1, 3)) and s.shape == (64, 3)
    assert w.view(8, 8)[2:6].eq(1).all() and w.view(8, 8)[:2].eq(0).all() and w.view(8, 8)[6:].eq(0).all()
    value = KLDivergenceLoss(temperature=2.0)(s, t, w)
    p_t, log_s = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
    by_hand = ((p_t * (p_t.log() - log_s)).sum(1) * w).sum() / w.sum() * 4
    assert value.item() == pytest.approx(by_hand.item(), rel=1e-5)


# ------------------------------------------------------------------------------------- config errors
OFFERS = {"dino": TeacherOutputs("dino", "dinov2"), "sam": TeacherOutputs("sam", "sam", can_segment=True)}


def test_a_teacher_that_cannot_segment_names_those_that_can():
    with pytest.raises(ConfigError) as err:
        resolve_output_term("mask_distill", "distillation.losses.m", "instance", "instance", 80, OFFERS["dino"], OFFERS)
    msg = str(err.value)
    assert "teacher 'dino' (dinov2) cannot" in msg and "sam, lora_sam, sam2" in msg and "vfmkd teacher" in msg
    assert "in this run: sam" in msg
    with pytest.raises(ConfigError, match="class scores.*vfmkd teacher"):
        resolve_output_term("cls_distill", "w", "detection", "detection", 80, OFFERS["sam"], OFFERS)
    with pytest.raises(ConfigError, match="kl_divergence.*use mask_distill"):
        resolve_output_term("kl_divergence", "w", "semantic", "semantic", 130, OFFERS["sam"], OFFERS)
    vf = TeacherOutputs("big", "vfmkd", heads={"detection": ("detection", 20)})
    with pytest.raises(ConfigError, match="20 classes.*80"):
        resolve_output_term("cls_distill", "w", "detection", "detection", 80, vf, {"big": vf})
    assert resolve_output_term("cls_distill", "w", "boxes", "detection", 20, vf,
                               {"big": vf}).teacher_head == "detection"


def test_build_loss_terms_validates_output_entries(coco128):
    model = build_model({"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                         "heads": {"detection": {"type": "yolo_head", "num_classes": 80},
                                   "instance": {"type": "yolo_seg_head", "num_classes": 80}}})
    with pytest.raises(ConfigError, match="sam, lora_sam, sam2"):
        build_loss_terms({"m": {"type": "mask_distill", "teacher": "dino"}}, model, {}, {}, teachers=OFFERS)
    with pytest.raises(ConfigError, match="'teacher: samm' is not an enabled teacher"):
        build_loss_terms({"m": {"type": "mask_distill", "teacher": "samm"}}, model, {}, {}, teachers=OFFERS)
    with pytest.raises(ConfigError, match="no head 'seg'"):
        build_loss_terms({"m": {"type": "mask_distill", "teacher": "sam", "head": "seg"}}, model, {}, {},
                         teachers=OFFERS)
    (term,) = build_loss_terms({"m": {"type": "mask_distill", "teacher": "sam", "temperature": 2.0}}, model, {}, {},
                               teachers=OFFERS)  # head: the only one SAM's masks serve
    assert (term.head, term.kind, term.log_name, term.teacher) == ("instance", "output", "loss_mask_distill", "sam")
    tables = output_class_channels(str(coco128), ["person"])
    assert tables["binary"][0] == 0 and tables["binary"][2] == -1  # det 0 = person, 2 = car
    assert tables["semantic"][0] == 1 and tables["semantic"][2] == 3  # semantic index of panoptic ids 1 and 3


def test_a_cache_without_mask_logits_names_the_command_that_adds_them():
    head, _ = seg_head_and_output()
    term = LossTerm("mask_distill", "output", 1.0, "loss_mask_distill", MaskDistillLoss(teacher="sam"), "instance",
                    OutputPairing(OutputRule("mask_distill", "instance", "masks"), head))
    distiller = Distiller([term])
    command = "python tools/prepare_teacher_features.py --teacher sam --dataset coco128 --outputs features,masks"
    reader = SimpleNamespace(has_masks=False, rebuild_command=lambda masks=False: command if masks else "features only")
    router = SimpleNamespace(
        sources={"sam": SimpleNamespace(cache=SimpleNamespace(reader=reader, path="f/train2017.h5"))}
    )
    with pytest.raises(ConfigError) as err:
        check_mask_sources(distiller, router)
    assert "teachers.sam" in str(err.value) and "no mask logits" in str(err.value) and command in str(err.value)
    reader.has_masks = True
    check_mask_sources(distiller, router)


# ------------------------------------------------------------------------------------- coco128, live SAM
def test_coco128_live_sam_masks_pair_with_instance_and_semantic_heads(coco128):
    from dataclasses import replace

    from vfmkd.datasets import DetectionDataset, collate_samples
    from vfmkd.distillation.online_distiller import OnlineTeacher
    from vfmkd.teachers.sam_teacher import SamTeacher

    torch.manual_seed(0)
    ds = DetectionDataset(str(coco128), "train2017", img_size=128, limit=2, instances=True)
    batch = collate_samples([ds[i] for i in range(2)])
    live = OnlineTeacher("sam", SamTeacher(init="random", input_size=128), torch.device("cpu"), masks=True)
    target = live.targets(batch)
    assert len(target.mask_logits) == len(batch.boxes.cls) > 0 and target.mask_logits.logits.shape[-1] == 32
    model = build_model({"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                         "heads": {"instance": {"type": "yolo_seg_head", "num_classes": 80},
                                   "semantic": {"type": "semantic_head", "num_classes": 134, "output_stride": 8}}})
    losses = {"mask_distill": {"teacher": "sam", "head": "instance", "type": "mask_distill"},
              "semantic_masks": {"teacher": "sam", "head": "semantic", "type": "mask_distill", "temperature": 2.0,
                                 "log_as": "loss_sem_mask_distill"},
              "semantic_cls": {"teacher": "sam", "head": "semantic", "type": "cls_distill"}}
    sam = {"sam": TeacherOutputs("sam", "sam", can_segment=True)}
    terms = build_loss_terms(losses, model, {}, {}, teachers=sam, class_channels=output_class_channels(str(coco128)))
    distiller = Distiller(terms)
    out = model(batch.images)
    result = distiller(out, batch, {"sam": target})
    for name in ("loss_mask_distill", "loss_sem_mask_distill", "loss_cls_distill", "loss_kd", "loss_distill_sam"):
        assert math.isfinite(result.logs[name]) and result.logs[name] > 0, name
    result.total.backward()
    assert model.heads["instance"].detect.proto.cv1.conv.weight.grad.abs().sum() > 0
    assert model.heads["semantic"].classifier.weight.grad.abs().sum() > 0

    # Every box of the view pairs with its own prompt's mask (live: the prompts are the view's boxes).
    pair = instance_mask_pair(model.heads["instance"], out.heads["instance"], batch, target)
    assert pair[1].shape[1] == len(batch.boxes.cls)
    # The same masks expressed in the original-image frame (a cache's frame) and mapped by the views'
    # affines land on the same cells: cached and live pairings share one geometry.
    view = batch.views.affine.double()
    a, b = target.affine.double()[:, :2], target.affine.double()[:, 2:]
    cached = replace(target, affine=torch.cat([a * view[:, :2], a * view[:, 2:] + b], 1).float(), student_affine=None)
    cached_pair = instance_mask_pair(model.heads["instance"], out.heads["instance"], batch, cached)
    assert torch.allclose(cached_pair[1], pair[1], atol=1e-3) and torch.equal(cached_pair[2], pair[2])
