"""The contract every registered loss meets (timm's ``list_models()`` pattern, for LOSSES).

Every name in ``LOSSES`` has at least one case in ``CASES``: its config entry as a user writes it
under ``distillation.losses.<x>`` in YAML (``weight``/``log_as`` included) and the value of its
formula, worked out in plain Python on a tiny hand-made input. For each registered loss:

- it builds from that entry the way the distiller builds it (``component_kwargs`` minus the
  distiller's reserved keys, plus the injected channel/level kwargs, or the head for task losses);
- its value equals the formula on the hand case;
- backward reaches what training updates (the channel adapter and the student map for feature
  losses, the student logits for output-KD losses, the head and its inputs for the task losses) and
  not what is masked out or is a teacher target.

Task losses are called as the distiller calls them: ``loss(head_output, batch)`` with the
:class:`~vfmkd.datasets.records.Batch`. The semantic and binary ones have hand-computed cases on
logits given directly (``inputs["logits"]``, ``inputs["target"]``); detection and instance
segmentation (ultralytics' assigner decides the positives) are checked through a real head.

A loss registered without a case fails ``test_every_registered_loss_has_a_case``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

import vfmkd.distillation.losses  # noqa: F401  (importing registers every loss)
from vfmkd.core.config import component_kwargs
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS, LOSSES
from vfmkd.datasets.records import Batch, BatchViews, DetectionBatch, InstanceBatch, ViewGeometry
from vfmkd.distillation.distiller import RESERVED_LOSS_KEYS
from vfmkd.distillation.losses.query_panoptic import PARTS as QUERY_PARTS
from vfmkd.models.heads.binary_head import BinaryHead
from vfmkd.models.heads.rtdetr_head import RTDETRHead
from vfmkd.models.heads.semantic_head import SemanticHead
from vfmkd.models.heads.yolo_head import YOLOv8DetectHead
from vfmkd.models.heads.yolo_seg_head import YOLOv8SegmentHead
from vfmkd.models.ultralytics_student import UltralyticsDetectHead
from vfmkd.models.unified_model import StudentOutput

# Losses registered by the package itself; a test module registering a throwaway loss of its own
# must not make this suite's outcome depend on test order.
REGISTERED = [n for n in LOSSES.names() if LOSSES.get(n).__module__.startswith("vfmkd.")]


@dataclass(frozen=True)
class Case:
    entry: Dict[str, Any]  # distillation.losses.<x> as written in YAML
    expected: Optional[float] = None  # the formula on the hand inputs (None: task loss checked through its head)
    inputs: Dict[str, Any] = field(default_factory=dict)  # output-KD: student/teacher logits + forward kwargs;
    # semantic/binary task: head logits and the (B, S, S) target
    no_grad_at: Optional[Tuple[Any, ...]] = None  # index into the student input that must get zero gradient
    label: str = ""

    @property
    def kind(self) -> str:
        return self.entry["type"]

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.label}" if self.label else self.kind


# ----------------------------------------------------------------------------- feature hand case
# One image, 2 student channels, 2 teacher channels, a 2x2 map, the bottom-right cell invalid
# (and wildly off, so counting it would show). The 1x1-conv adapter is set to a = W s + b.
W = [[1.0, 1.0], [0.0, 2.0]]
B = [0.5, -1.0]
STUDENT = [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [-1.0, 2.0]]]  # (C, H, W)
TEACHER = [[[1.0, 3.0], [2.0, 0.0]], [[0.0, 1.0], [-2.0, 5.0]]]
MASK = [[1.0, 1.0], [1.0, 0.0]]
CELLS = [(y, x) for y in range(2) for x in range(2)]
VALID = [(y, x) for (y, x) in CELLS if MASK[y][x]]
INVALID = [(y, x) for (y, x) in CELLS if not MASK[y][x]]


def adapted_at(y: int, x: int) -> List[float]:
    s = [STUDENT[c][y][x] for c in range(2)]
    return [sum(W[o][i] * s[i] for i in range(2)) + B[o] for o in range(2)]


def teacher_at(y: int, x: int) -> List[float]:
    return [TEACHER[c][y][x] for c in range(2)]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def cos(u: List[float], v: List[float]) -> float:
    return sum(a * b for a, b in zip(u, v)) / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def smooth_l1(d: float, beta: float) -> float:
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


# a: (0,0) (1.5, -1)  (0,1) (3.5, 1)  (1,0) (2.5, -3)       t: (1, 0)  (3, 1)  (2, -2)
# d = a - t:  (0.5, -1)   (0.5, 0)   (0.5, -1)
MSE_BY_HAND = ((0.25 + 1) / 2 + (0.25 + 0) / 2 + (0.25 + 1) / 2) / 3  # = 0.458333...
# beta 0.8: |d| 0.5 < beta -> 0.5 * 0.25 / 0.8 = 0.15625; |d| 1 >= beta -> 1 - 0.4 = 0.6; d 0 -> 0
SMOOTH_L1_BY_HAND = ((0.15625 + 0.6) / 2 + (0.15625 + 0) / 2 + (0.15625 + 0.6) / 2) / 3  # = 0.278125
COSINE_BY_HAND = mean(1 - cos(adapted_at(*p), teacher_at(*p)) for p in VALID)
# FA at factor 1: mean over valid pairs (i, j) of |cos(a_i, a_j) - cos(t_i, t_j)| (9 pairs, 3 diagonal zeros).
AFFINITY_BY_HAND = mean(
    abs(cos(adapted_at(*p), adapted_at(*q)) - cos(teacher_at(*p), teacher_at(*q))) for p in VALID for q in VALID
)
REPORTED_COSINE_BY_HAND = mean(cos(adapted_at(*p), teacher_at(*p)) for p in VALID)


# ----------------------------------------------------------------------------- summary hand case
# The pooled student (2,) through an identity MLP (conv -> GELU -> conv) vs a summary token (2,).
def gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


SUMMARY_S, SUMMARY_T = [1.0, -2.0], [0.5, 3.0]
SUMMARY_A = [gelu(v) for v in SUMMARY_S]
# cosine_weight 1, smooth_l1_weight 2, beta 0.5
SUMMARY_BY_HAND = (1 - cos(SUMMARY_A, SUMMARY_T)) + 2.0 * mean(smooth_l1(a - t, 0.5) for a, t in zip(SUMMARY_A,
                                                                                                  SUMMARY_T))


# ----------------------------------------------------------------------------- output-KD hand cases
def softmax(row: List[float], temp: float) -> List[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def kl(p: List[float], q: List[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bernoulli_kl(t_logit: float, s_logit: float, temp: float) -> float:
    p, q = sigmoid(t_logit / temp), sigmoid(s_logit / temp)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


KD_S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.5, 0.5, -2.0]]  # (N=3, K=3)
KD_T = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0], [-1.0, 2.0, 0.0]]
KD_W = [2.0, 0.0, 1.0]
KD_ROW = [kl(softmax(t, 2.0), softmax(s, 2.0)) for s, t in zip(KD_S, KD_T)]

CLS_S = [[[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]]]  # (B=1, K=2, A=3), ultralytics' scores layout
CLS_T = [[[1.0, -2.0, 0.0], [3.0, 0.5, 1.0]]]
CLS_MASK = [[1.0, 1.0, 0.0]]  # (B, A): the third anchor is not distilled
CLS_ANCHORS = [a for a in range(3) if CLS_MASK[0][a]]

MASK_S = [[[[0.5, -1.0], [2.0, 0.0]]]]  # (B=1, M=1, 2, 2)
MASK_T = [[[[1.0, 1.0], [-2.0, 3.0]]]]

# ----------------------------------------------------------------------------- task hand cases
def dice(p: List[float], g: List[float], smooth: float) -> float:
    return 1 - (2 * sum(a * b for a, b in zip(p, g)) + smooth) / (sum(p) + sum(g) + smooth)


# Semantic: one image, K = 3 classes (0 = unlabeled), S = 2, logits already at S (no resize).
SEM_L = [[[[0.5, 0.0], [1.0, -1.0]], [[1.0, 2.0], [0.0, 0.5]], [[-1.0, 0.5], [2.0, 0.0]]]]  # (1, 3, 2, 2)
SEM_T = [[[0, 1], [2, 1]]]  # (1, 2, 2): the top-left pixel is unlabeled
SEM_PIX = [(y, x) for y in range(2) for x in range(2) if SEM_T[0][y][x] != 0]
SEM_P = {(y, x): softmax([SEM_L[0][k][y][x] for k in range(3)], 1.0) for (y, x) in SEM_PIX}
SEM_CE = mean(-math.log(SEM_P[p][SEM_T[0][p[0]][p[1]]]) for p in SEM_PIX)
SEM_DICE = mean(
    dice([SEM_P[p][k] for p in SEM_PIX], [float(SEM_T[0][p[0]][p[1]] == k) for p in SEM_PIX], 1.0) for k in (1, 2)
)
# Resized: a 1x1 logit map bilinearly upsampled to S = 2 is that constant at every pixel; class 2 is absent.
SEM1_L = [[[[0.2]], [[1.0]], [[-0.5]]]]  # (1, 3, 1, 1)
SEM1_T = [[[1, 0], [1, 1]]]
SEM1_P = softmax([0.2, 1.0, -0.5], 1.0)
SEM1_CE = -math.log(SEM1_P[1])
SEM1_DICE = dice([SEM1_P[1]] * 3, [1.0] * 3, 1.0)  # only class 1 is present

# Binary: one image, S = 2; 255 (bottom-left) is ignored.
BIN_L = [[[[0.5, -1.0], [2.0, 0.0]]]]  # (1, 1, 2, 2)
BIN_T = [[[1, 0], [255, 1]]]
BIN_PIX = [(y, x) for y in range(2) for x in range(2) if BIN_T[0][y][x] != 255]
BIN_BCE = mean(
    -(
        BIN_T[0][y][x] * math.log(sigmoid(BIN_L[0][0][y][x]))
        + (1 - BIN_T[0][y][x]) * math.log(1 - sigmoid(BIN_L[0][0][y][x]))
    )
    for (y, x) in BIN_PIX
)
BIN_DICE = dice([sigmoid(BIN_L[0][0][y][x]) for (y, x) in BIN_PIX], [float(BIN_T[0][y][x]) for (y, x) in BIN_PIX], 1.0)

# Encoder distillation (EdgeSAM phase 1): the head's embeddings vs the teacher map, mean over channels
# of the squared difference, averaged over the valid cells (bottom-right is padding).
EMB_S = [[[1.0, 2.0], [3.0, 4.0]], [[0.5, 1.5], [-1.0, 2.0]]]  # (C, H, W)
EMB_T = [[[0.0, 3.0], [2.0, 0.0]], [[1.0, 0.0], [-2.0, 5.0]]]
EMB_BY_HAND = mean(mean((EMB_S[c][y][x] - EMB_T[c][y][x]) ** 2 for c in range(2)) for (y, x) in VALID)

# Decoder distillation (phase 2): bce x BCE + dice x Dice against sigmoid(teacher logits), weighted per cell.
PROMPT_P = [[sigmoid(v) for v in row] for row in MASK_S[0][0]]
PROMPT_T = [[sigmoid(v) for v in row] for row in MASK_T[0][0]]
PROMPT_BCE = mean(-(PROMPT_T[y][x] * math.log(PROMPT_P[y][x]) + (1 - PROMPT_T[y][x]) * math.log(1 - PROMPT_P[y][x]))
                  for (y, x) in VALID)
PROMPT_DICE = 1 - (2 * sum(PROMPT_P[y][x] * PROMPT_T[y][x] for (y, x) in VALID) + 1.0) / (
    sum(PROMPT_P[y][x] for (y, x) in VALID) + sum(PROMPT_T[y][x] for (y, x) in VALID) + 1.0)

CASES: List[Case] = [
    Case(
        {"type": "embedding_distill", "teacher": "sam", "weight": 1.0},
        EMB_BY_HAND,
        {"student": [EMB_S], "teacher": [EMB_T], "mask": [[MASK]]},
        no_grad_at=(0, slice(None), 1, 1),
    ),
    Case(
        {"type": "prompt_distill", "teacher": "sam", "bce": 2.0, "dice": 3.0, "weight": 1.0},
        2.0 * PROMPT_BCE + 3.0 * PROMPT_DICE,
        {"student": MASK_S[0], "teacher": MASK_T[0], "weight": [MASK]},
        no_grad_at=(0, 1, 1),
    ),
    Case({"type": "feature_mse", "teacher": "sam", "weight": 2.0, "log_as": "loss_sam_mse"}, MSE_BY_HAND),
    Case({"type": "feature_smooth_l1", "teacher": "sam", "beta": 0.8, "weight": 1.0}, SMOOTH_L1_BY_HAND),
    Case({"type": "feature_cosine", "teacher": "sam", "weight": 0.5, "log_as": "loss_sam_cos"}, COSINE_BY_HAND),
    Case({"type": "feature_affinity", "teacher": "sam", "fa_subscale": 1, "weight": 0.1}, AFFINITY_BY_HAND),
    Case({"type": "summary_distill", "teacher": "sam", "cosine_weight": 1.0, "smooth_l1_weight": 2.0, "beta": 0.5,
          "weight": 0.5}, SUMMARY_BY_HAND),
    Case(
        {"type": "kl_divergence", "temperature": 2.0, "weight": 0.5, "log_as": "loss_kd"},
        2.0 ** 2 * mean(KD_ROW),
        {"student": KD_S, "teacher": KD_T},
        label="batchmean",
    ),
    Case(
        {"type": "kl_divergence", "temperature": 2.0},
        2.0 ** 2 * sum(w * v for w, v in zip(KD_W, KD_ROW)) / sum(KD_W),
        {"student": KD_S, "teacher": KD_T, "weight": KD_W},
        no_grad_at=(1,),  # the zero-weight row
        label="row-weights",
    ),
    Case(
        {"type": "cls_distill", "temperature": 2.0, "mode": "sigmoid", "teacher": "sam", "weight": 1.0},
        2.0 ** 2 * mean(sum(bernoulli_kl(CLS_T[0][k][a], CLS_S[0][k][a], 2.0) for k in range(2)) for a in CLS_ANCHORS),
        {"student": CLS_S, "teacher": CLS_T, "mask": CLS_MASK},
        no_grad_at=(0, slice(None), 2),
        label="sigmoid",
    ),
    Case(
        {"type": "cls_distill", "temperature": 2.0, "mode": "softmax"},
        2.0 ** 2 * mean(
            kl(softmax([CLS_T[0][k][a] for k in range(2)], 2.0), softmax([CLS_S[0][k][a] for k in range(2)], 2.0))
            for a in CLS_ANCHORS
        ),
        {"student": CLS_S, "teacher": CLS_T, "mask": CLS_MASK},
        no_grad_at=(0, slice(None), 2),
        label="softmax",
    ),
    Case(
        {"type": "mask_distill", "temperature": 1.5, "teacher": "sam", "weight": 0.3},
        1.5 ** 2 * mean(bernoulli_kl(MASK_T[0][0][y][x], MASK_S[0][0][y][x], 1.5) for (y, x) in VALID),
        {"student": MASK_S, "teacher": MASK_T, "mask": [[MASK]]},
        no_grad_at=(0, 0, 1, 1),
    ),
    Case({"type": "detection", "weight": 1.0, "box": 7.5, "cls": 0.5, "dfl": 1.5}),
    Case({"type": "instance_segmentation", "head": "instance", "weight": 1.0, "box": 7.5, "cls": 0.5, "dfl": 1.5}),
    Case({"type": "rtdetr_detection", "weight": 1.0, "cls": 1.0, "l1": 5.0, "giou": 2.0}),
    Case({"type": "ultralytics", "head": "detection", "weight": 1.0, "box": 7.5, "cls": 0.5, "dfl": 1.5},
         label="yolov8n-detect"),
    Case({"type": "query_panoptic", "head": "panoptic", "weight": 1.0, "cls": 2.0, "mask": 5.0, "dice": 5.0, "iou": 1.0,
          "num_points": 64}),
    Case(
        {"type": "semantic_segmentation", "head": "semantic", "ce": 1.0, "dice": 0.5, "weight": 1.0},
        SEM_CE + 0.5 * SEM_DICE,
        {"logits": SEM_L, "target": SEM_T, "parts": {"ce": SEM_CE, "dice": 0.5 * SEM_DICE}},
        no_grad_at=(0, slice(None), 0, 0),  # the unlabeled pixel
        label="at-S",
    ),
    Case(
        {"type": "semantic_segmentation", "head": "semantic", "ce": 2.0, "dice": 1.0},
        2.0 * SEM1_CE + SEM1_DICE,
        {"logits": SEM1_L, "target": SEM1_T, "parts": {"ce": 2.0 * SEM1_CE, "dice": SEM1_DICE}},
        label="upsampled",
    ),
    Case(
        {"type": "binary_segmentation", "head": "binary", "bce": 1.0, "dice": 2.0, "weight": 0.5},
        BIN_BCE + 2.0 * BIN_DICE,
        {"logits": BIN_L, "target": BIN_T, "parts": {"bce": BIN_BCE, "dice": 2.0 * BIN_DICE}},
        no_grad_at=(0, 0, 1, 0),  # the ignored (255) pixel
    ),
]

CASES_BY_LOSS: Dict[str, List[Case]] = {}
for _case in CASES:
    CASES_BY_LOSS.setdefault(_case.kind, []).append(_case)

HEAD_SPECS = [FeatureSpec("P3", 8, 8), FeatureSpec("P4", 16, 16), FeatureSpec("P5", 32, 32)]
# yolov8n's Detect reads these levels (an ultralytics head is built from its model file, its channels with it)
YOLOV8N_SPECS = [FeatureSpec("P3", 64, 8), FeatureSpec("P4", 128, 16), FeatureSpec("P5", 256, 32)]
# The query head's classes: 0 unlabeled, 1-2 things, 3 stuff; detection class d -> semantic index (2: none)
QUERY_CLASSES, CLASS_OF_DETECTION = 4, [1, 2, -1]

# The head each task loss is built with (the distiller hands it the model head its entry names).
TASK_HEADS = {
    "detection": lambda: YOLOv8DetectHead(HEAD_SPECS, num_classes=3),
    "instance_segmentation": lambda: YOLOv8SegmentHead(HEAD_SPECS, num_classes=3, num_masks=4, num_protos=8),
    "semantic_segmentation": lambda: SemanticHead(HEAD_SPECS, num_classes=3, channels=8),
    "binary_segmentation": lambda: BinaryHead(HEAD_SPECS, channels=8),
    "rtdetr_detection": lambda: RTDETRHead(HEAD_SPECS, num_classes=3, num_queries=10, hidden_dim=32, num_heads=4,
                                           ffn_dim=64, num_decoder_layers=2),
    "ultralytics": lambda: UltralyticsDetectHead(YOLOV8N_SPECS, model="yolov8n.yaml", num_classes=3),
    "query_panoptic": lambda: HEADS.build("rapsam_head", in_specs=HEAD_SPECS, num_classes=QUERY_CLASSES, num_queries=8,
                                          channels=16, num_heads=2, ffn_dim=32),
}
# What a task loss's build_term adds to its entry besides the head (query_panoptic: the dataset's detection class ->
# semantic index table, from context.class_channels, and the head's name in the student output it reads).
TASK_CONTEXT = {"query_panoptic": {"class_of_detection": CLASS_OF_DETECTION, "head_name": "panoptic"}}


def make_batch(size: int, n: int, boxes: Optional[DetectionBatch] = None, **fields) -> Batch:
    """A Batch of ``n`` blank ``size`` x ``size`` canvases (identity views) with the given targets."""
    view = ViewGeometry(matrix=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], affine=(1.0, 1.0, 0.0, 0.0),
                        content_box=(0, 0, size, size), orig_hw=(size, size))
    if boxes is None:
        boxes = DetectionBatch(torch.zeros(0, 1), torch.zeros(0, 4), torch.zeros(0))
    return Batch(images=torch.zeros(n, 3, size, size), image_ids=[f"im{i}" for i in range(n)],
                 views=BatchViews.stack([view] * n), boxes=boxes, **fields)


def group_of(name: str) -> str:
    return getattr(LOSSES.get(name), "kind", "feature")  # the distiller's default, too


def build_like_the_distiller(entry: Dict[str, Any], head: Optional[YOLOv8DetectHead] = None):
    """What the engine does with one ``distillation.losses`` entry: the config keys minus the
    reserved ``weight``/``log_as``, plus the head (task losses) or the resolved teacher map, student
    level and channel sizes (feature losses). Mirrors ``vfmkd.engine.builders.build_loss_terms``."""
    kind = entry["type"]
    kwargs = component_kwargs(entry, reserved=RESERVED_LOSS_KEYS)
    if group_of(kind) == "task":
        kwargs.pop("head", "detection")
        kwargs["head"] = head if head is not None else TASK_HEADS[kind]()
        kwargs.update(TASK_CONTEXT.get(kind, {}))
    elif group_of(kind) == "feature":
        kwargs.update(teacher_feature="image_embeddings", student_level="P4", student_channels=2, teacher_channels=2)
    return LOSSES.build(kind, where=f"distillation.losses.{kind}", **kwargs)


def cases_for(name: str) -> List[Case]:
    if name not in CASES_BY_LOSS:
        pytest.fail(f"loss '{name}' is registered but has no case in tests/test_loss_contract.py CASES")
    return CASES_BY_LOSS[name]


def nonzero(t: Optional[torch.Tensor]) -> bool:
    return t is not None and bool(torch.isfinite(t).all()) and bool((t != 0).any())

def assert_backward_trains_the_head(case: Case, value: torch.Tensor, feats: Dict[str, torch.Tensor],
                                    head: torch.nn.Module) -> None:
    """``value.backward()`` reaches every input level of the head and every trainable head parameter (frozen
    ones, e.g. ultralytics' DFL projection, are not asked)."""
    value.backward()
    for level, f in feats.items():
        assert nonzero(f.grad), f"{case.id}: no gradient reaches the {level} input of the head"
    missing = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{case.id}: head parameters without gradient: {missing}"



# ----------------------------------------------------------------------------- coverage
def test_every_registered_loss_has_a_case():
    missing = sorted(set(REGISTERED) - set(CASES_BY_LOSS))
    assert not missing, f"registered losses without a contract case (add them to CASES): {missing}"


def test_every_case_names_a_registered_loss():
    stale = sorted(set(CASES_BY_LOSS) - set(LOSSES.names()))
    assert not stale, f"CASES has entries for losses that are no longer registered: {stale}"


# ----------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", REGISTERED)
def test_builds_from_its_yaml_entry(name):
    for case in cases_for(name):
        module = build_like_the_distiller(case.entry)
        assert module.kind in ("task", "output", "feature"), f"{name}: kind {module.kind!r} has no weighting group"
        if module.kind == "feature":
            assert (module.teacher, module.student_level, module.teacher_feature) == ("sam", "P4", "image_embeddings")


def _feature_case(module, case: Case) -> None:
    with torch.no_grad():
        module.adapter.proj.weight.copy_(torch.tensor(W).view(2, 2, 1, 1))
        module.adapter.proj.bias.copy_(torch.tensor(B))
    student = torch.tensor([STUDENT], requires_grad=True)
    value, cosine = module(student, torch.tensor([TEACHER]), torch.tensor([[MASK]]))
    assert float(value.detach()) == pytest.approx(case.expected, rel=1e-5, abs=1e-7), f"{case.id}: formula"
    assert float(cosine) == pytest.approx(REPORTED_COSINE_BY_HAND, rel=1e-5), f"{case.id}: reported cosine"
    value.backward()
    for pname, p in module.adapter.named_parameters():
        assert nonzero(p.grad), f"{case.id}: no gradient reaches adapter.{pname}"
    for y, x in VALID:
        assert nonzero(student.grad[0, :, y, x]), f"{case.id}: no gradient at valid cell {(y, x)}"
    for y, x in INVALID:
        assert torch.equal(student.grad[0, :, y, x], torch.zeros(2)), f"{case.id}: gradient at masked cell {(y, x)}"


def _summary_case(module, case: Case) -> None:
    """A summary loss: the pooled (B, C, 1, 1) student through its MLP vs the teacher's summary token;
    a spatial teacher map is refused."""
    with torch.no_grad():
        for conv in (module.adapter[0], module.adapter[2]):
            conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            conv.bias.zero_()
    student = torch.tensor(SUMMARY_S).view(1, 2, 1, 1).requires_grad_()
    value, cosine = module(student, torch.tensor(SUMMARY_T).view(1, 2, 1, 1), torch.ones(1, 1, 1, 1))
    assert float(value.detach()) == pytest.approx(case.expected, rel=1e-5), f"{case.id}: formula"
    assert float(cosine) == pytest.approx(cos(SUMMARY_A, SUMMARY_T), rel=1e-5), f"{case.id}: reported cosine"
    value.backward()
    assert nonzero(student.grad) and all(nonzero(p.grad) for p in module.adapter.parameters()), case.id
    with pytest.raises(ConfigError, match="not a summary token"):
        module(torch.tensor([STUDENT]), torch.tensor([TEACHER]), torch.tensor([[MASK]]))


def _output_case(module, case: Case) -> None:
    inputs = dict(case.inputs)
    student = torch.tensor(inputs.pop("student"), requires_grad=True)
    teacher = torch.tensor(inputs.pop("teacher"), requires_grad=True)
    value = module(student, teacher, **{k: torch.tensor(v) for k, v in inputs.items()})
    assert value.dim() == 0
    assert float(value.detach()) == pytest.approx(case.expected, rel=1e-5, abs=1e-7), f"{case.id}: formula"
    value.backward()
    assert teacher.grad is None, f"{case.id}: gradient reaches the teacher logits (a target)"
    reached = student.grad.clone()
    if case.no_grad_at is not None:
        assert torch.equal(reached[case.no_grad_at], torch.zeros_like(reached[case.no_grad_at])), f"{case.id}: masked"
        reached[case.no_grad_at] = 1.0
    assert bool((reached != 0).all()), f"{case.id}: some distilled student logits get no gradient"


# Two 64x64 images: P3 8x8, P4 4x4, P5 2x2; three boxes (normalised xywh), one image has two.
TASK_BOXES = DetectionBatch(
    cls=torch.tensor([[0.0], [2.0], [1.0]]),
    bboxes=torch.tensor([[0.3, 0.3, 0.25, 0.25], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]]),
    batch_idx=torch.tensor([0.0, 0.0, 1.0]),
)


def instance_targets() -> InstanceBatch:
    """The three boxes as instances: each mask fills its box on the 16x16 (S/4) grid."""
    masks = torch.zeros(3, 16, 16)
    for n, (cx, cy, w, h) in enumerate(TASK_BOXES.bboxes.tolist()):
        x1, x2, y1, y2 = (int(round(v * 16)) for v in (cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2))
        masks[n, y1:y2, x1:x2] = 1.0
    return InstanceBatch(cls=TASK_BOXES.cls, bboxes=TASK_BOXES.bboxes, batch_idx=TASK_BOXES.batch_idx, masks=masks,
                         label_index=torch.arange(3), labelled=torch.tensor([True, True]))


def _head_task_case(case: Case) -> None:
    """Detection / instance segmentation (vfmkd's YOLOv8 heads, or an ultralytics head under its own
    criterion) through a real head: the documented parts sum to the loss and backward reaches the head's
    inputs and every branch."""
    torch.manual_seed(0)
    head = TASK_HEADS[case.kind]().train()
    module = build_like_the_distiller(case.entry, head=head)
    specs = YOLOV8N_SPECS if case.kind == "ultralytics" else HEAD_SPECS
    feats = {s.name: torch.randn(2, s.channels, 64 // s.stride, 64 // s.stride, requires_grad=True) for s in specs}
    batch = make_batch(64, 2, boxes=TASK_BOXES, instances=instance_targets())
    value, items = module(head(feats), batch)
    assert value.dim() == 0 and bool(torch.isfinite(value)) and float(value.detach()) > 0, f"{case.id}: {value}"
    parts = {"detection": {"box", "cls", "dfl"}, "ultralytics": {"box", "cls", "dfl"},
             "instance_segmentation": {"box", "seg", "cls", "dfl"}}[case.kind]
    assert set(items) == parts
    # Documented: the parts (each with its gain), averaged per image, sum to the loss.
    assert float(value.detach()) == pytest.approx(sum(float(v) for v in items.values()), rel=1e-5)
    assert all(float(v) > 0 for v in items.values()), f"{case.id}: {items}"
    assert_backward_trains_the_head(case, value, feats, head)
    last = {"box": "cv2", "cls": "cv3", "mask coefficients": "cv4"}  # ultralytics' branches, per level
    branches = ("box", "cls", "mask coefficients") if case.kind == "instance_segmentation" else ("box", "cls")
    for branch in branches:
        assert all(nonzero(head.detect.get_submodule(f"{last[branch]}.{i}.2").weight.grad) for i in range(3)), branch
    if case.kind == "instance_segmentation":
        assert nonzero(head.detect.proto.cv3.conv.weight.grad), "no gradient reaches the prototypes"


def _pixel_task_case(case: Case) -> None:
    """Semantic / binary: the hand formula on logits given directly."""
    module = build_like_the_distiller(case.entry)
    logits = torch.tensor(case.inputs["logits"], requires_grad=True)
    target = torch.tensor(case.inputs["target"])
    field_name = "semantic" if case.kind == "semantic_segmentation" else "binary"
    target = target.long() if field_name == "semantic" else target.to(torch.uint8)
    value, items = module(logits, make_batch(target.shape[-1], target.shape[0], **{field_name: target}))
    assert value.dim() == 0
    assert float(value.detach()) == pytest.approx(case.expected, rel=1e-5, abs=1e-7), f"{case.id}: formula"
    assert {k: float(v) for k, v in items.items()} == pytest.approx(case.inputs["parts"], rel=1e-5), f"{case.id}: parts"
    value.backward()
    reached = logits.grad.clone()
    if case.no_grad_at is not None:
        assert torch.equal(reached[case.no_grad_at], torch.zeros_like(reached[case.no_grad_at])), f"{case.id}: ignored"
        reached[case.no_grad_at] = 1.0
    assert bool((reached != 0).all()), f"{case.id}: some labelled logits get no gradient"


def _rtdetr_task_case(case: Case) -> None:
    """RT-DETR through a real head: the loss runs the head's decoder with the batch's boxes
    (denoising queries), its parts ``cls``/``l1``/``giou`` sum to it, and backward reaches the
    head's inputs and every trained decoder weight (Hungarian matching decides the positives)."""
    torch.manual_seed(0)
    head = TASK_HEADS[case.kind]().train()
    module = build_like_the_distiller(case.entry, head=head)
    feats = {s.name: torch.randn(2, s.channels, 64 // s.stride, 64 // s.stride, requires_grad=True) for s in HEAD_SPECS}
    value, items = module(head(feats), make_batch(64, 2, boxes=TASK_BOXES))
    assert value.dim() == 0 and bool(torch.isfinite(value)) and float(value.detach()) > 0, f"{case.id}: {value}"
    assert set(items) == {"cls", "l1", "giou"} and all(float(v) > 0 for v in items.values()), f"{case.id}: {items}"
    assert float(value.detach()) == pytest.approx(sum(float(v) for v in items.values()), rel=1e-5)
    assert_backward_trains_the_head(case, value, feats, head)
    assert nonzero(head.decoder.denoising_class_embed.weight.grad), f"{case.id}: the denoising queries were not trained"
    # No boxes in the batch: no denoising, the loss is still finite (every query is background).
    empty = DetectionBatch(torch.zeros(0, 1), torch.zeros(0, 4), torch.zeros(0))
    value, items = module(head(feats), make_batch(64, 2, boxes=empty))
    assert bool(torch.isfinite(value)) and float(items["l1"]) == 0.0


def semantic_targets() -> torch.Tensor:
    """(2, 64, 64) semantic indices: each mapped box's thing class (detection 0 -> 1, 1 -> 2; class 2 maps to
    none), stuff class 3 on the bottom rows of image 0 and the left columns of image 1, 0 (unlabeled) elsewhere."""
    sem = torch.zeros(2, 64, 64, dtype=torch.long)
    sem[0, 56:], sem[1, :, :8] = 3, 3
    for (cx, cy, w, h), d, i in zip(TASK_BOXES.bboxes.tolist(), TASK_BOXES.cls.view(-1).tolist(),
                                    TASK_BOXES.batch_idx.tolist()):
        if CLASS_OF_DETECTION[int(d)] > 0:
            x1, x2, y1, y2 = (int(round(v * 64)) for v in (cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2))
            sem[int(i), y1:y2, x1:x2] = CLASS_OF_DETECTION[int(d)]
    return sem


def _query_task_case(case: Case) -> None:
    """The query panoptic loss reads the whole student output: its targets are each image's mapped things
    (instance masks) plus one mask per stuff class of its semantic map; the four weighted parts sum to the
    loss, backward reaches the head's inputs and every head parameter; unlabelled images give 0 on the graph."""
    torch.manual_seed(0)
    head = TASK_HEADS[case.kind]().train()
    module = build_like_the_distiller(case.entry, head=head)
    feats = {s.name: torch.randn(2, s.channels, 64 // s.stride, 64 // s.stride, requires_grad=True) for s in HEAD_SPECS}
    batch = make_batch(64, 2, boxes=TASK_BOXES, instances=instance_targets(), semantic=semantic_targets())
    points = torch.rand(16, 2)
    found = [sorted(module.image_targets(batch, i, points).classes.tolist()) for i in range(2)]
    assert found == [[1, 3], [2, 3]], f"{case.id}: the unmapped detection class is no target, stuff is: {found}"
    value, items = module(StudentOutput({}, feats, {"panoptic": head(feats)}), batch)
    assert value.dim() == 0 and bool(torch.isfinite(value)) and float(value.detach()) > 0, f"{case.id}: {value}"
    assert set(items) == set(QUERY_PARTS) and all(float(v) > 0 for v in items.values()), f"{case.id}: {items}"
    assert float(value.detach()) == pytest.approx(sum(float(v) for v in items.values()), rel=1e-5)
    assert_backward_trains_the_head(case, value, feats, head)
    unlabelled = make_batch(64, 2, boxes=TASK_BOXES, instances=instance_targets(),
                            semantic=torch.zeros(2, 64, 64, dtype=torch.long))
    value, items = module(StudentOutput({}, feats, {"panoptic": head(feats)}), unlabelled)
    assert float(value.detach()) == 0.0 and value.requires_grad and set(items) == set(QUERY_PARTS), case.id


def _task_case(case: Case) -> None:
    if case.kind == "rtdetr_detection":
        _rtdetr_task_case(case)
    elif case.kind == "query_panoptic":
        _query_task_case(case)
    elif case.expected is None:
        _head_task_case(case)
    else:
        _pixel_task_case(case)


@pytest.mark.parametrize("name", REGISTERED)
def test_value_and_backward(name):
    for case in cases_for(name):
        if group_of(name) == "task":
            _task_case(case)
            continue
        module = build_like_the_distiller(case.entry)
        if name == "summary_distill":
            _summary_case(module, case)
        elif module.kind == "feature":
            _feature_case(module, case)
        else:
            _output_case(module, case)
