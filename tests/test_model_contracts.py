"""One contract test over every registered neck and head, fed by real backbones (the pattern of
tests/test_backbones.py): a neck's outputs are exactly what its ``feature_specs()`` declares, and a
head produces its documented output in train and eval mode. A neck or head registered in vfmkd
without a case here fails ``test_every_registered_neck_and_head_is_covered``."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple

import pytest
import torch
from ultralytics.utils.tal import make_anchors

import vfmkd.models  # noqa: F401  (registers the built-in components)
from vfmkd.core.registry import BACKBONES, HEADS, NECKS, Registry
from vfmkd.datasets.records import DetectionBatch

B, H, W = 2, 96, 128  # non-square on purpose

# A backbone entry: (registry name, kwargs). The chains cover equal and unequal level widths and a
# pyramid that does not start at stride 8.
YOLOV8N = ("yolov8", {"variant": "n"})
VIT_TINY = ("vit", {"variant": "tiny", "out_channels": 64})
REGNET_S4 = ("regnet", {"variant": "regnetx_002", "strides": [4, 8, 16]})
REPVIT = ("repvit", {"variant": "repvit_m0_9"})
MAMBA_TINY = ("mamba", {"variant": "tiny"})
# ultralytics' own networks split by vfmkd (vfmkd/models/ultralytics_student.py); 3 classes
ULTRA_V8N = ("ultralytics", {"model": "yolov8n.yaml", "num_classes": 3})
ULTRA_11N_SEG = ("ultralytics", {"model": "yolo11n-seg.yaml", "num_classes": 3})
# the neck an ultralytics student gets (its own neck is inside the backbone)
IDENTITY = {"type": "identity"}

# Each registered neck: (backbone, neck kwargs) pairs; in_specs come from the backbone.
NECK_CASES: Dict[str, List[Tuple[Tuple[str, dict], dict]]] = {
    "yolov8_pafpn": [(YOLOV8N, {"depth": 1}), (("yolov8", {"variant": "m"}), {"depth": 2}), (VIT_TINY, {}),
                     (REGNET_S4, {"depth": 1})],
    # every student's P3-P5 (equal and unequal widths), a 4/8/16 pyramid, and each fusion mode
    "fusion_fpn": [(YOLOV8N, {}), (("regnet", {"variant": "regnetx_002"}), {"channels": 48, "fusion": "sum"}),
                   (REPVIT, {"fusion": "avg"}), (VIT_TINY, {"channels": 32}), (REGNET_S4, {"fusion": "learnable"}),
                   (MAMBA_TINY, {"channels": 32})],
    # an ultralytics trunk's Detect inputs, and a vfmkd backbone's levels passed on untouched
    "identity": [(ULTRA_V8N, {}), (REGNET_S4, {})],
}


def check_yolo_head(head, kwargs: Mapping[str, Any], feats: Mapping[str, torch.Tensor], train_out, eval_out) -> None:
    """yolo_head's documented output. Train: ultralytics' raw dict with ``boxes`` (B, 4*reg_max, A),
    ``scores`` (B, num_classes, A) and ``feats`` (the input levels); eval: a tuple whose first item
    is (B, 4 + num_classes, A), xywh boxes in input pixels then class probabilities. A is the number
    of cells over all levels."""
    nc, reg_max = kwargs.get("num_classes", 80), kwargs.get("reg_max", 16)
    levels = list(feats.values())
    anchors = sum(f.shape[-2] * f.shape[-1] for f in levels)
    assert set(train_out) == {"boxes", "scores", "feats"}
    assert train_out["boxes"].shape == (B, 4 * reg_max, anchors)
    assert train_out["scores"].shape == (B, nc, anchors)
    assert [f.shape for f in train_out["feats"]] == [f.shape for f in levels]

    assert isinstance(eval_out, tuple)
    check_decoded(head, eval_out[0], levels, nc, reg_max)
    assert head.task == "detection"


def check_decoded(head, pred: torch.Tensor, levels: List[torch.Tensor], nc: int, reg_max: int, extra: int = 0) -> None:
    """(B, 4 + nc + extra, A): xywh boxes in input pixels, class probabilities, ``extra`` more rows."""
    anchors = sum(f.shape[-2] * f.shape[-1] for f in levels)
    assert pred.shape == (B, 4 + nc + extra, anchors)
    assert torch.isfinite(pred).all()
    probs = pred[:, 4:4 + nc]
    assert ((probs >= 0) & (probs <= 1)).all()
    # Decoded in input pixels: each box centre lies within (reg_max - 1) / 2 strides of its cell
    # centre and each side within 2 (reg_max - 1) strides (DFL distances are in [0, reg_max - 1]).
    points, stride = make_anchors(levels, head.detect.stride, 0.5)  # (A, 2) cell units, (A, 1)
    centre_px, stride = (points * stride).T, stride.T  # (2, A), (1, A)
    xy, wh = pred[:, :2], pred[:, 2:4]
    assert ((xy - centre_px).abs() <= (reg_max - 1) / 2 * stride + 1e-3).all()
    assert ((wh >= -1e-3) & (wh <= 2 * (reg_max - 1) * stride + 1e-3)).all()


def check_yolo_seg_head(head, kwargs: Mapping[str, Any], feats: Mapping[str, torch.Tensor], train_out,
                        eval_out, has_proto_stride: bool = True) -> None:
    """yolo_seg_head's (and ultralytics_segment's, which has no ``proto_stride``) documented output.
    Train: ultralytics' raw dict, yolo_head's keys plus
    ``mask_coefficient`` (B, num_masks, A) and ``proto`` (B, num_masks, 2H0, 2W0) (the first level
    upsampled x2: S/4 on a P3-P5 neck); eval: ``((decoded (B, 4 + nc + num_masks, A), proto), raw)``."""
    nc, reg_max, nm = kwargs.get("num_classes", 80), kwargs.get("reg_max", 16), kwargs.get("num_masks", 32)
    levels = list(feats.values())
    anchors = sum(f.shape[-2] * f.shape[-1] for f in levels)
    proto_hw = (2 * levels[0].shape[-2], 2 * levels[0].shape[-1])
    assert set(train_out) == {"boxes", "scores", "feats", "mask_coefficient", "proto"}
    assert train_out["boxes"].shape == (B, 4 * reg_max, anchors)
    assert train_out["scores"].shape == (B, nc, anchors)
    assert train_out["mask_coefficient"].shape == (B, nm, anchors)
    assert train_out["proto"].shape == (B, nm, *proto_hw)
    if has_proto_stride:
        assert head.proto_stride == H / proto_hw[0]
    (decoded, proto), raw = eval_out
    check_decoded(head, decoded, levels, nc, reg_max, extra=nm)
    assert torch.equal(decoded[:, 4 + nc:], raw["mask_coefficient"])  # the coefficients ride along undecoded
    assert proto.shape == (B, nm, *proto_hw) and torch.equal(proto, raw["proto"])
    assert head.task == "instance"


def check_ultralytics_segment(head, kwargs: Mapping[str, Any], feats: Mapping[str, torch.Tensor], train_out,
                              eval_out) -> None:
    """ultralytics_segment: ultralytics' Segment output, the same contract as yolo_seg_head's."""
    check_yolo_seg_head(head, kwargs, feats, train_out, eval_out, has_proto_stride=False)


def check_rapsam_head(head, kwargs: Mapping[str, Any], feats: Mapping[str, torch.Tensor], train_out,
                      eval_out) -> None:
    """rapsam_head: ``(class_logits (B, Q, num_classes + 1), mask_logits (B, Q, H/8, W/8), iou (B, Q) in
    [0, 1])`` in train and eval mode alike."""
    nc, q = kwargs["num_classes"], kwargs.get("num_queries", 100)
    for out in (train_out, eval_out):
        logits, masks, iou = out
        assert logits.shape == (B, q, nc + 1) and masks.shape == (B, q, H // 8, W // 8) and iou.shape == (B, q)
        assert all(torch.isfinite(t).all() for t in out) and ((iou >= 0) & (iou <= 1)).all()
    assert head.task == "panoptic_query" and head.set_prediction and head.num_queries == q


def check_pixel_head(channels: int, task: str):
    """semantic_head / binary_head: (B, channels, H/output_stride, W/output_stride) logits in both modes."""
    def check(head, kwargs: Mapping[str, Any], feats: Mapping[str, torch.Tensor], train_out, eval_out) -> None:
        out_stride = kwargs.get("output_stride", 8)
        n = kwargs["num_classes"] if channels == 0 else channels
        for out in (train_out, eval_out):
            assert out.shape == (B, n, H // out_stride, W // out_stride)
            assert torch.isfinite(out).all()
        assert head.task == task and head.output_stride == out_stride and head.num_classes == n
    return check


def check_sam_decoder(head, kwargs: Mapping[str, Any], feats: Mapping[str, torch.Tensor], train_out, eval_out) -> None:
    """sam_decoder: (B, embed_dim, H/16, W/16) image embeddings in both modes (its stride-16 level);
    ``decode`` with box prompts gives (N, 1, H/4, W/4) low-res logits and (N, 1) IoU predictions
    (3 of each with ``multimask_output``)."""
    e = kwargs.get("embed_dim", 256)
    for out in (train_out, eval_out):
        assert out.shape == (B, e, H // 16, W // 16) and torch.isfinite(out).all()
    assert head.task == "promptable" and head.in_level in feats and feats[head.in_level].shape[-1] == W // 16
    boxes = torch.tensor([[4.0, 8.0, 60.0, 70.0], [0.0, 0.0, W - 1.0, H - 1.0], [30.0, 20.0, 50.0, 40.0]])
    with torch.no_grad():
        low, iou = head.decode(eval_out, torch.tensor([1, 0, 1]), boxes=boxes)
        multi, iou3 = head.decode(eval_out, torch.tensor([0, 1, 1]), points=boxes[:, None, :2] + 2,
                                  point_labels=torch.ones(3, 1, dtype=torch.long), multimask_output=True)
    assert low.shape == (3, 1, H // 4, W // 4) and iou.shape == (3, 1) and torch.isfinite(low).all()
    assert multi.shape == (3, 3, H // 4, W // 4) and iou3.shape == (3, 3) and torch.isfinite(multi).all()


def sam_decoder_train_loss(head, train_out) -> torch.Tensor:
    """Every sam_decoder parameter in the graph: box, point (padded) and point+box+mask prompts,
    single and multimask outputs, IoU predictions."""
    b, _, h, w = train_out.shape
    idx = torch.arange(b)
    boxes = torch.tensor([[2.0, 2.0, 40.0, 30.0]]).repeat(b, 1)
    pts, lbl = torch.tensor([[[10.0, 12.0], [20.0, 8.0]]]).repeat(b, 1, 1), torch.tensor([[1, 0]]).repeat(b, 1)
    low, iou = head.decode(train_out, idx, boxes=boxes)
    multi, iou3 = head.decode(train_out, idx, points=pts, point_labels=lbl, multimask_output=True)
    refined, iou_r = head.decode(train_out, idx, boxes=boxes, points=pts, point_labels=lbl, mask_input=low)
    return sum(t.float().sum() for t in (low, iou, multi, iou3, refined, iou_r))


# Boxes for a DETR-style head's training pass (its loss hands it the batch's boxes: denoising queries).
CONTRACT_BOXES = DetectionBatch(cls=torch.tensor([[0.0], [2.0], [1.0]]), batch_idx=torch.tensor([0.0, 0.0, 1.0]),
                                bboxes=torch.tensor([[0.3, 0.3, 0.25, 0.25], [0.7, 0.6, 0.3, 0.4],
                                                     [0.5, 0.5, 0.5, 0.5]]))


def check_rtdetr_head(head, kwargs: Mapping[str, Any], feats: Mapping[str, torch.Tensor], train_out, eval_out) -> None:
    """rtdetr_head's documented output. Train: ``{"feats": levels}`` (the decoder inputs; its loss
    runs ``decode`` with the boxes), and ``decode`` gives ultralytics' training tuple as a dict;
    eval: ``(pred (B, 4 + nc, Q), raw)``, xywh boxes in input pixels then class probabilities of
    Q = min(num_queries, cells) queries, and the same boxes normalised in ``raw``."""
    nc, layers = kwargs.get("num_classes", 80), kwargs.get("num_decoder_layers", 6)
    levels = list(feats.values())
    queries = min(kwargs.get("num_queries", 300), sum(f.shape[-2] * f.shape[-1] for f in levels))
    assert set(train_out) == {"feats"} and all(a is b for a, b in zip(train_out["feats"], levels))
    head.train()
    dec = head.decode(train_out, CONTRACT_BOXES)
    dn = dec["dn_meta"]["dn_num_split"][0]
    assert dec["dn_meta"]["dn_num_split"][1] == queries and dn > 0
    assert dec["dec_bboxes"].shape == (layers, B, dn + queries, 4)
    assert dec["dec_scores"].shape == (layers, B, dn + queries, nc)
    assert dec["enc_bboxes"].shape == (B, queries, 4) and dec["enc_scores"].shape == (B, queries, nc)

    pred, raw = eval_out
    assert pred.shape == (B, 4 + nc, queries) and torch.isfinite(pred).all()
    probs = pred[:, 4:]
    assert ((probs >= 0) & (probs <= 1)).all()
    assert torch.allclose(probs, raw["pred_logits"].sigmoid().permute(0, 2, 1))
    scale = torch.tensor([W, H, W, H], dtype=pred.dtype).view(1, 4, 1)
    assert torch.allclose(pred[:, :4], raw["pred_boxes"].permute(0, 2, 1) * scale, atol=1e-4)
    assert ((pred[:, 0] >= 0) & (pred[:, 0] <= W) & (pred[:, 1] >= 0) & (pred[:, 1] <= H)).all()  # centres inside
    assert head.task == "detection" and head.num_classes == nc


def rtdetr_train_loss(head, train_out) -> torch.Tensor:
    """rtdetr_head's training pass ends in its loss, which runs the decoder with the batch's boxes."""
    dec = head.decode(train_out, CONTRACT_BOXES)
    return sum(t.float().sum() for t in dec.values() if torch.is_tensor(t))


# A head whose training output is not its whole graph names a loss that reaches every parameter.
TRAIN_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {"rtdetr_head": rtdetr_train_loss,
                                                     "sam_decoder": sam_decoder_train_loss}


# Each registered head: (its output check, [(backbone, neck kwargs, head kwargs)]); the head is built
# from the neck's declared specs: yolov8_pafpn unless the neck kwargs name another ``type``.
HEAD_CASES: Dict[str, Tuple[Callable[..., None], List[Tuple[Tuple[str, dict], dict, dict]]]] = {
    "yolo_head": (
        check_yolo_head,
        [(YOLOV8N, {"depth": 1}, {"num_classes": 80}), (REGNET_S4, {"depth": 1}, {"num_classes": 3, "reg_max": 8})],
    ),
    "yolo_seg_head": (
        check_yolo_seg_head,
        [
            (YOLOV8N, {"depth": 1}, {"num_classes": 80}),
            (REGNET_S4, {"depth": 1}, {"num_classes": 3, "reg_max": 8, "num_masks": 8, "num_protos": 16}),
        ],
    ),
    "semantic_head": (
        check_pixel_head(0, "semantic"),
        [
            (YOLOV8N, {"depth": 1}, {"num_classes": 5}),
            (REGNET_S4, {"depth": 1}, {"num_classes": 3, "channels": 16, "output_stride": 4}),
        ],
    ),
    "binary_head": (
        check_pixel_head(1, "binary"),
        [(YOLOV8N, {"depth": 1}, {"output_stride": 4}), (REGNET_S4, {"depth": 1}, {"channels": 16})],
    ),
    "rtdetr_head": (
        check_rtdetr_head,
        [
            (YOLOV8N, {"depth": 1}, {"num_classes": 80, "num_decoder_layers": 2}),
            (
                REGNET_S4,
                {"depth": 1},
                {
                    "num_classes": 3,
                    "num_queries": 40,
                    "hidden_dim": 64,
                    "num_heads": 4,
                    "ffn_dim": 128,
                    "num_decoder_layers": 3,
                },
            ),
        ],
    ),
    "ultralytics_detect": (check_yolo_head, [(ULTRA_V8N, IDENTITY, {"model": "yolov8n.yaml", "num_classes": 3})]),
    "ultralytics_segment": (
        check_ultralytics_segment,
        [(ULTRA_11N_SEG, IDENTITY, {"model": "yolo11n-seg.yaml", "num_classes": 3})],
    ),
    "rapsam_head": (
        check_rapsam_head,
        [
            (YOLOV8N, {"depth": 1}, {"num_classes": 5, "num_queries": 10, "channels": 32, "num_stages": 1}),
            (REGNET_S4, {"depth": 1}, {"num_classes": 3, "num_queries": 4, "channels": 16, "num_stages": 2,
                                       "num_heads": 2, "ffn_dim": 32, "fusion": "sum"}),
        ],
    ),
    # every student backbone's stride-16 level (RegNet's is its last, P4 of 4/8/16); ViT at embed_dim 64
    "sam_decoder": (
        check_sam_decoder,
        [
            (YOLOV8N, {"depth": 1}, {}),
            (REPVIT, {"depth": 1}, {}),
            (REGNET_S4, {"depth": 1}, {"trainable_decoder": False}),
            (VIT_TINY, {"depth": 1}, {"in_level": "P4", "embed_dim": 64}),
            (MAMBA_TINY, {"depth": 1}, {}),
        ],
    ),
}


def builtin(registry: Registry) -> set:
    """The names registered by vfmkd itself (a user's components registered by other tests don't count)."""
    return {n for n in registry.names() if getattr(registry.get(n), "__module__", "").startswith("vfmkd.")}


def test_every_registered_neck_and_head_is_covered():
    assert builtin(NECKS) <= set(NECK_CASES), f"add a neck case for {builtin(NECKS) - set(NECK_CASES)}"
    assert builtin(HEADS) <= set(HEAD_CASES), f"add a head case for {builtin(HEADS) - set(HEAD_CASES)}"


def case_id(value) -> str:
    return str(value).replace(" ", "")


@pytest.mark.parametrize(
    "name, backbone, kwargs", [(n, bb, kw) for n in sorted(NECK_CASES) for bb, kw in NECK_CASES[n]], ids=case_id
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_neck_outputs_match_its_declared_specs(name, backbone, kwargs, mode):
    torch.manual_seed(0)
    bb = BACKBONES.build(backbone[0], **backbone[1]).eval()
    neck = NECKS.build(name, in_specs=bb.feature_specs(), **kwargs).train(mode == "train")
    with torch.no_grad():
        out = neck(bb(torch.rand(B, 3, H, W)))
    specs = neck.feature_specs()
    assert list(out) == [s.name for s in specs]
    for spec, feat in zip(specs, out.values()):
        assert feat.shape == (B, spec.channels, H // spec.stride, W // spec.stride), spec
        assert torch.isfinite(feat).all(), spec


@pytest.mark.parametrize(
    "name, backbone, neck_kwargs, kwargs",
    [(n, *case) for n in sorted(HEAD_CASES) for case in HEAD_CASES[n][1]], ids=case_id,
)
def test_head_produces_its_documented_output_in_train_and_eval(name, backbone, neck_kwargs, kwargs):
    torch.manual_seed(0)
    bb = BACKBONES.build(backbone[0], **backbone[1]).eval()
    neck_kwargs = dict(neck_kwargs)
    neck_type = neck_kwargs.pop("type", "yolov8_pafpn")
    neck = NECKS.build(neck_type, in_specs=bb.feature_specs(), **neck_kwargs).eval()
    with torch.no_grad():
        feats = neck(bb(torch.rand(B, 3, H, W)))
    head = HEADS.build(name, in_specs=neck.feature_specs(), **kwargs)

    head.train()
    train_out = head(feats)
    if name in TRAIN_LOSSES:
        loss = TRAIN_LOSSES[name](head, train_out)
    else:
        loss = sum(t.float().sum() for t in (train_out.values() if isinstance(train_out, dict) else train_out)
                   if torch.is_tensor(t))
    loss.backward()
    missing = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient in train mode for {missing}"

    head.eval()
    with torch.no_grad():
        eval_out = head(feats)
    HEAD_CASES[name][0](head, kwargs, feats, train_out, eval_out)
