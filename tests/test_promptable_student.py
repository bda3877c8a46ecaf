"""The promptable SAM-decoder student (issue 12, items 1-2): the sam_decoder head (segment-anything's
own PromptEncoder / MaskDecoder), init_from_teacher from a checkpoint in SAM's official layout, the
two EdgeSAM losses (embedding_distill, prompt_distill) by hand, gradients through the decoder into the
backbone, the config errors, and the staged repvit_edgesam_coco128 recipe end to end with a live
random-init SAM at 128 px."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry

from vfmkd.core.config import experiment_from_dict, read_yaml
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.datasets.records import Batch, BatchViews, DetectionBatch, ViewGeometry
from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.losses import EmbeddingDistillLoss, PromptDistillLoss
from vfmkd.distillation.pairing.output_pairs import check_mask_sources
from vfmkd.distillation.pairing.output_rules import TeacherOutputs
from vfmkd.distillation.pairing.prompt_pairs import error_region, sample_cells
from vfmkd.distillation.targets import MaskLogits, TeacherTargets
from vfmkd.engine.builders import build_loss_terms, build_model
from vfmkd.models.heads.sam_decoder_head import SamDecoderHead

S = 64
SPECS = [FeatureSpec("P3", 8, 8), FeatureSpec("P4", 16, 16), FeatureSpec("P5", 32, 32)]
SAM_SPECS = {"sam": (FeatureSpec("trunk", 768, 16), FeatureSpec("image_embeddings", 256, 16))}
PRIMARY = {"sam": "image_embeddings"}
TEACHERS = {"sam": TeacherOutputs("sam", "sam", can_segment=True), "dino": TeacherOutputs("dino", "dinov2")}
LOSSES = {"embedding_distill": {"type": "embedding_distill", "teacher": "sam", "head": "promptable"},
          "prompt_distill": {"type": "prompt_distill", "teacher": "sam", "head": "promptable", "bce": 5.0, "dice": 5.0,
                             "points": 1, "refine_iters": 1}}


def feats(b: int = 2, size: int = S):
    return {s.name: torch.rand(b, s.channels, size // s.stride, size // s.stride) for s in SPECS}


# ------------------------------------------------------------------------------------- the head
def test_decode_shapes_and_the_stride_16_level():
    torch.manual_seed(0)
    head = SamDecoderHead(SPECS)
    assert head.in_level == "P4" and head.task == "promptable"
    emb = head(feats())
    assert emb.shape == (2, 256, 4, 4)
    boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0], [0.0, 0.0, 63.0, 63.0], [10.0, 12.0, 20.0, 22.0]])
    idx = torch.tensor([1, 0, 1])
    low, iou = head.decode(emb, idx, boxes=boxes)
    assert low.shape == (3, 1, 16, 16) and iou.shape == (3, 1)
    # one image at a time gives the same rows: the per-image grouping keeps the prompt order
    alone, _ = head.decode(emb[1:], torch.tensor([0]), boxes=boxes[2:])
    assert torch.allclose(low[2], alone[0], atol=1e-5)
    multi, iou3 = head.decode(emb, idx, points=boxes[:, None, :2] + 1, point_labels=torch.tensor([[1], [0], [1]]),
                              mask_input=low, multimask_output=True)
    assert multi.shape == (3, 3, 16, 16) and iou3.shape == (3, 3)
    assert head.prompt_encoder.input_image_size == (S, S) and head.prompt_encoder.image_embedding_size == (4, 4)
    with pytest.raises(ValueError, match="boxes and/or points"):
        head.decode(emb, idx)


def test_in_level_that_is_not_stride_16_names_the_one_to_pick():
    with pytest.raises(ConfigError, match=r"in_level 'P3' has stride 8.*set in_level: P4"):
        SamDecoderHead(SPECS, in_level="P3")
    with pytest.raises(ConfigError, match=r"no stride-16 level.*add 16 to the backbone's strides"):
        SamDecoderHead([SPECS[0], SPECS[2]])


def test_frozen_decoder_still_passes_gradients_to_its_input():
    head = SamDecoderHead(SPECS, trainable_decoder=False)
    assert not any(p.requires_grad for p in head.mask_decoder.parameters())
    assert not any(p.requires_grad for p in head.prompt_encoder.parameters())
    f = feats(1)
    f["P4"].requires_grad_(True)
    low, _ = head.decode(head(f), torch.tensor([0]), boxes=torch.tensor([[4.0, 4.0, 40.0, 40.0]]))
    low.sum().backward()
    assert f["P4"].grad is not None and f["P4"].grad.abs().sum() > 0


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    """segment-anything's randomly initialised vit_b, saved in the official layout (a plain state_dict)."""
    torch.manual_seed(1)
    sam = sam_model_registry["vit_b"]()
    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    return path, {k: v for k, v in sam.state_dict().items() if k.startswith(("prompt_encoder.", "mask_decoder."))}


def test_init_from_teacher_loads_the_official_decoder(sam_checkpoint):
    path, decoder = sam_checkpoint
    head = SamDecoderHead(SPECS, init_from_teacher=str(path))
    mine = {k: v for k, v in head.state_dict().items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    assert set(mine) == set(decoder)
    for key, value in decoder.items():
        assert torch.equal(mine[key], value), key


def test_a_checkpoint_whose_decoder_does_not_fit_is_refused_by_name(sam_checkpoint, tmp_path):
    path, decoder = sam_checkpoint
    with pytest.raises(CheckpointError, match=rf"{path.name}.*does not fit sam_decoder.*shapes differ"):
        SamDecoderHead(SPECS, embed_dim=128, init_from_teacher=str(path))
    with pytest.raises(CheckpointError, match=rf"{path.name} is SAM vit_b.*set variant: vit_b"):
        SamDecoderHead(SPECS, variant="vit_l", init_from_teacher=str(path))
    other = tmp_path / "not_sam.pth"
    torch.save({"backbone.conv.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match=r"not_sam.pth holds no prompt_encoder\.\* weights"):
        SamDecoderHead(SPECS, init_from_teacher=str(other))
    cut = tmp_path / "cut.pth"
    torch.save({k: v for k, v in decoder.items() if not k.startswith("mask_decoder.iou_prediction_head")}, cut)
    with pytest.raises(CheckpointError, match=r"cut.pth: its mask_decoder does not fit.*missing"):
        SamDecoderHead(SPECS, init_from_teacher=str(cut))


# ------------------------------------------------------------------------------------- the losses
def test_embedding_distill_value_by_hand():
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[0.0, 2.0]], [[1.0, 4.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])  # the second cell is padding
    # cell 0: mean over channels of (1)^2 and (2)^2 = 2.5; cell 1 masked out
    assert float(EmbeddingDistillLoss(teacher="sam")(s, t, mask)) == pytest.approx(2.5)
    assert float(EmbeddingDistillLoss()(s, t, torch.ones(1, 1, 1, 2))) == pytest.approx((2.5 + 8.0) / 2)


def test_prompt_distill_value_by_hand():
    student = torch.tensor([[[0.0, 2.0]]])  # one mask of 1 x 2 cells
    teacher = torch.tensor([[[1.0, -1.0]]])
    weight = torch.ones(1, 1, 2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    t0, t1, p0, p1 = sig(1.0), sig(-1.0), sig(0.0), sig(2.0)
    bce = (-(t0 * math.log(p0) + (1 - t0) * math.log(1 - p0)) - (t1 * math.log(p1) + (1 - t1) * math.log(1 - p1))) / 2
    dice = 1 - (2 * (p0 * t0 + p1 * t1) + 1) / (p0 + p1 + t0 + t1 + 1)
    loss = PromptDistillLoss(teacher="sam", bce=5.0, dice=5.0)
    assert float(loss(student, teacher, weight)) == pytest.approx(5 * bce + 5 * dice, rel=1e-5)
    assert float(PromptDistillLoss(bce=2.0, dice=0.0)(student, teacher, weight)) == pytest.approx(2 * bce, rel=1e-5)
    # weight 0 on the second cell: BCE over the first cell only, Dice from its sums alone
    w = torch.tensor([[[1.0, 0.0]]])
    bce0 = -(t0 * math.log(p0) + (1 - t0) * math.log(1 - p0))
    dice0 = 1 - (2 * p0 * t0 + 1) / (p0 + t0 + 1)
    assert float(PromptDistillLoss(bce=1.0, dice=1.0)(student, teacher, w)) == pytest.approx(bce0 + dice0, rel=1e-5)
    with pytest.raises(ConfigError, match="points and refine_iters"):
        PromptDistillLoss(points=-1)


def test_points_come_from_the_region_and_corrections_from_the_error():
    gen = torch.Generator().manual_seed(0)
    region = torch.zeros(2, 4, 4, dtype=torch.bool)
    region[0, 1, 2] = region[0, 3, 3] = True
    idx, ok = sample_cells(region, 2, gen)
    assert ok.tolist() == [True, False] and sorted(idx[0].tolist()) == [6, 15]
    pred = torch.full((1, 2, 2), -1.0)
    pred[0, 0, 0] = 1.0  # predicted foreground where the target is background: the only error
    target = torch.tensor([[[False, False], [False, False]]])
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    assert error_region(pred, target, valid)[0].tolist() == [[True, False], [False, False]]
    assert error_region(torch.full((1, 2, 2), -1.0), target, valid).all()  # no error, no foreground: anywhere valid


# ------------------------------------------------------------------------------------- pairing and gradients
def make_batch(boxes_px, batch_idx, n_images=2, size=S) -> Batch:
    b = torch.tensor(boxes_px, dtype=torch.float32).view(-1, 4)
    cxcywh = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1) / size
    view = ViewGeometry(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (1.0, 1.0, 0.0, 0.0), (0, 0, size, size), (size, size))
    return Batch(images=torch.rand(n_images, 3, size, size), image_ids=[f"im{i}" for i in range(n_images)],
                 views=BatchViews.stack([view] * n_images),
                 boxes=DetectionBatch(cls=torch.zeros(len(b), 1), bboxes=cxcywh,
                                      batch_idx=torch.tensor(batch_idx, dtype=torch.float32),
                                      label_index=torch.arange(len(b), dtype=torch.int64)))


def live_targets(batch: Batch, size=S) -> TeacherTargets:
    """A live SAM pass on the student canvas: 256 x S/16 embeddings and one S/4 mask per box (the box filled)."""
    n_images = len(batch)
    boxes = batch.boxes
    masks = torch.full((len(boxes.cls), size // 4, size // 4), -4.0)
    xyxy = torch.cat([boxes.bboxes[:, :2] - boxes.bboxes[:, 2:] / 2, boxes.bboxes[:, :2] + boxes.bboxes[:, 2:] / 2], 1)
    for i, (x1, y1, x2, y2) in enumerate((xyxy * size / 4).round().long().tolist()):
        masks[i, y1:y2, x1:x2] = 4.0
    logits = MaskLogits(logits=masks, batch_idx=boxes.batch_idx.long(), label_index=boxes.label_index,
                        cls=boxes.cls.view(-1).long())
    eye = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * n_images)
    return TeacherTargets(features={"image_embeddings": torch.randn(n_images, 256, size // 16, size // 16)},
                          affine=eye, valid_hw=torch.tensor([[size, size]] * n_images, dtype=torch.float32),
                          input_size=size, student_affine=eye.clone(), mask_logits=logits)


def small_model():
    return build_model({"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                        "heads": {"promptable": {"type": "sam_decoder"}}})


def test_both_losses_train_the_decoder_and_the_backbone():
    torch.manual_seed(0)
    model = small_model()
    distiller = Distiller(build_loss_terms(LOSSES, model, SAM_SPECS, PRIMARY, teachers=TEACHERS))
    assert distiller.teachers_needing_masks() == ("sam",) and distiller.teachers_needing_heads() == ()
    batch = make_batch([[4, 4, 30, 40], [20, 10, 60, 50], [8, 8, 40, 24]], [0, 0, 1])
    targets = {"sam": live_targets(batch)}
    out = model(batch.images)
    pairing = distiller.terms["prompt_distill"].pairing
    (student, teacher, weight), _ = pairing.pair(out.heads["promptable"], batch, targets["sam"])
    # 3 boxes + 3 point prompts, each refined once: 12 masks on the S/4 grid
    assert student.shape == teacher.shape == weight.shape == (12, S // 4, S // 4)
    assert torch.equal(teacher[:3], targets["sam"].mask_logits.logits)
    result = distiller(out, batch, targets)
    assert {"loss_embed_distill", "loss_prompt_distill", "loss_distill_sam"} <= set(result.logs)
    assert all(math.isfinite(v) for v in result.logs.values())
    result.total.backward()
    head = model.heads["promptable"]
    for name, module in (("mask_decoder", head.mask_decoder), ("prompt_encoder", head.prompt_encoder),
                         ("neck", head.neck), ("backbone", model.backbone)):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    # stage 1 (embedding_distill only): the decoder is not in the graph
    model.zero_grad(set_to_none=True)
    distiller.set_stage(["embedding_distill"])
    distiller(model(batch.images), batch, targets).total.backward()
    assert all(p.grad is None for p in head.mask_decoder.parameters())
    assert any(p.grad is not None for p in model.backbone.parameters())


def test_a_resume_draws_the_same_point_prompts():
    """prompt_distill's point generator travels in the checkpoint (Distiller.sampling_states), so a
    resumed run samples the prompts the uninterrupted run would have."""
    torch.manual_seed(0)
    model = small_model()
    batch = make_batch([[4, 4, 30, 40], [20, 10, 60, 50], [8, 8, 40, 24]], [0, 0, 1])
    targets = live_targets(batch)
    with torch.no_grad():
        emb = model(batch.images).heads["promptable"]
    running = Distiller(build_loss_terms(LOSSES, model, SAM_SPECS, PRIMARY, teachers=TEACHERS))
    running.terms["prompt_distill"].pairing.pair(emb, batch, targets)  # the generator has drawn: its state moved
    states = running.sampling_states()
    assert list(states) == ["prompt_distill"] and list(states["prompt_distill"]) == ["cpu"]
    want = running.terms["prompt_distill"].pairing.pair(emb, batch, targets)[0]
    resumed = Distiller(build_loss_terms(LOSSES, model, SAM_SPECS, PRIMARY, teachers=TEACHERS))
    fresh = resumed.terms["prompt_distill"].pairing.pair(emb, batch, targets)[0]  # restarted from the seed
    resumed = Distiller(build_loss_terms(LOSSES, model, SAM_SPECS, PRIMARY, teachers=TEACHERS))
    resumed.load_sampling_states(states)
    got = resumed.terms["prompt_distill"].pairing.pair(emb, batch, targets)[0]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert not all(torch.equal(a, b) for a, b in zip(want, fresh))
    with pytest.raises(ValueError, match="not an output term"):
        resumed.load_sampling_states({"missing": states["prompt_distill"]})


def test_embedding_distill_masks_padded_cells():
    torch.manual_seed(0)
    model = small_model()
    distiller = Distiller(build_loss_terms({"embedding_distill": LOSSES["embedding_distill"]}, model, SAM_SPECS,
                                           PRIMARY,
                                           teachers=TEACHERS))
    batch = make_batch([[4, 4, 30, 40]], [0], n_images=1)
    target = live_targets(batch)
    target.valid_hw = torch.tensor([[S, S / 2]])  # the right half of the teacher canvas is padding
    out = model(batch.images)
    (s, t, mask), _ = distiller.terms["embedding_distill"].pairing.pair(out.heads["promptable"], batch, target)
    assert mask[0, 0, :, :2].eq(1).all() and mask[0, 0, :, 2:].eq(0).all()
    assert torch.allclose(t, target.features["image_embeddings"])  # the same grid: identity geometry


# ------------------------------------------------------------------------------------- bad input
def test_prompt_distill_from_a_teacher_without_masks_names_the_ones_that_have_them():
    model = small_model()
    specs = dict(SAM_SPECS, dino=(FeatureSpec("patch_tokens", 384, 14),))
    bad = {"prompt_distill": dict(LOSSES["prompt_distill"], teacher="dino")}
    with pytest.raises(ConfigError, match=r"teacher 'dino' \(dinov2\) gives none.*sam, lora_sam, sam2, sam3 "
                                          r"\(in this run: sam\)"):
        build_loss_terms(bad, model, specs, dict(PRIMARY, dino="patch_tokens"), teachers=TEACHERS)
    with pytest.raises(ConfigError, match=r"embedding_distill needs a teacher map 256 wide at stride 16"):
        build_loss_terms({"e": dict(LOSSES["embedding_distill"], teacher="dino")}, model, specs,
                         dict(PRIMARY, dino="patch_tokens"), teachers=TEACHERS)
    with pytest.raises(ConfigError, match=r"trains a promptable head.*'detection' is a detection head"):
        seg = build_model({"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                           "heads": {"detection": {"type": "yolo_head", "num_classes": 2}}})
        build_loss_terms({"p": dict(LOSSES["prompt_distill"], head="detection")}, seg, SAM_SPECS, PRIMARY,
                         teachers=TEACHERS)


def test_a_cache_without_masks_names_the_command_that_adds_them():
    model = small_model()
    distiller = Distiller(build_loss_terms(LOSSES, model, SAM_SPECS, PRIMARY, teachers=TEACHERS))
    command = "python tools/prepare_teacher_features.py --teacher sam --outputs features,masks --splits train2017"
    reader = SimpleNamespace(has_masks=False, rebuild_command=lambda masks: command)
    router = SimpleNamespace(
        sources={"sam": SimpleNamespace(cache=SimpleNamespace(path="teacher_features/sam/train2017.h5", reader=reader))}
    )
    with pytest.raises(ConfigError, match=r"(?s)prompt_distill distil its box-prompted mask logits.*--outputs "
                                          r"features,masks"):
        check_mask_sources(distiller, router)


# ------------------------------------------------------------------------------------- the recipe
def test_repvit_edgesam_two_stages_with_a_live_random_sam(tmp_path):
    raw = read_yaml("configs/experiments/repvit_edgesam_coco128.yaml")
    for stage in raw["train"]["stages"]:
        stage["epochs"] = 1
    from vfmkd.engine.training.trainer import Trainer

    cfg = experiment_from_dict(raw, [
        "teachers.sam.offline=false", "teachers.sam.init=random", "teachers.sam.input_size=128",
        "model.heads.promptable.init_from_teacher=null", f"work_dir={tmp_path}", "data.limit=2", "data.img_size=128",
        "data.batch_size=2", "data.num_workers=0", "eval.batch_size=2", "train.warmup_iters=1", "train.vis_interval=0",
        "train.eval_interval=2"],
        "repvit_edgesam_coco128.yaml")
    metrics = Trainer(cfg, progress=False).fit()
    first, second = (e["train"] for e in metrics["epochs"])
    assert "loss_prompt_distill" not in first and math.isfinite(first["loss_embed_distill"])
    assert math.isfinite(second["loss_embed_distill"]) and math.isfinite(second["loss_prompt_distill"])
    assert second["loss_prompt_distill"] > 0 and math.isfinite(second["loss"])
