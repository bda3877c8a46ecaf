"""An example user task, added from outside vfmkd in one file (docs/adding_a_task.md walks through it):
saliency, "is this pixel part of any labelled thing", trained from the semantic masks. The file
holds the task (its typed output, the labels it loads, its loss, its scorer and its picture row), a
head for it and the loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryJaccardIndex

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS, LOSSES, TASKS
from vfmkd.datasets.records import Batch
from vfmkd.distillation.losses.task import TaskLoss
from vfmkd.models.heads import BaseHead
from vfmkd.tasks import DenseOutput, DenseTask
from vfmkd.tasks.pictures import PanelRow, PictureContext, Prediction
from vfmkd.tasks.scoring.context import ScoringContext


@dataclass
class SaliencyOutput(DenseOutput):
    """Saliency logits (B, 1, S/stride, S/stride); sigmoid > 0.5 is salient."""

    def on_canvas(self, size: Tuple[int, int]) -> torch.Tensor:
        """(B, 1, S, S) logits bilinearly resized to the canvas (the labels' size)."""
        return F.interpolate(self.logits.float(), size=size, mode="bilinear", align_corners=False)


def salient(batch: Batch) -> torch.Tensor:
    """(B, S, S) {0, 1}: pixels the semantic masks label with any class."""
    return (batch.semantic > 0).to(torch.uint8)


@TASKS.register("saliency")
class SaliencyTask(DenseTask):
    """Salient (any semantic class) vs unlabeled pixels; reads the semantic masks, scored by IoU."""

    name = "saliency"
    label_kinds = frozenset({"semantic"})
    default_loss = "saliency_bce"
    output_type = SaliencyOutput
    primary_metric = ("iou", "IoU")

    def build_scorer(self, head: str, context: ScoringContext) -> SaliencyScorer:
        return SaliencyScorer(head)

    def picture_row(self, head: str, output: SaliencyOutput, batch: Batch, context: PictureContext) -> PanelRow:
        return PanelRow(head, Prediction.binary(output.logits.float().sigmoid()), context.teacher_masks,
                        Prediction.binary_target(salient(batch)))


class SaliencyScorer:
    """IoU of the salient pixels (logit > 0 on the canvas vs :func:`salient`) over the split."""

    def __init__(self, head: str) -> None:
        self.head, self.iou = head, BinaryJaccardIndex()

    def update(self, out: Any, batch: Batch) -> None:
        logits = SaliencyTask().read_output(out.heads[self.head]).on_canvas(tuple(batch.semantic.shape[-2:]))
        self.iou.update((logits[:, 0] > 0).long().cpu(), salient(batch).long().cpu())

    def result(self) -> Dict[str, float]:
        return {"iou": float(self.iou.compute())}


@HEADS.register("saliency_head")
class SaliencyHead(BaseHead):
    """One 1x1 conv on the finest neck level: (B, 1, S/stride, S/stride) logits."""

    task = "saliency"

    def __init__(self, in_specs: Sequence[FeatureSpec]) -> None:
        super().__init__()
        self.level_names = [in_specs[0].name]
        self.logit = nn.Conv2d(in_specs[0].channels, 1, 1)

    def forward(self, feats: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logit(feats[self.level_names[0]])


@LOSSES.register("saliency_bce")
class SaliencyLoss(TaskLoss):
    """BCE of the canvas-sized logits against :func:`salient` (B, S, S)."""

    def __init__(self, head: nn.Module) -> None:
        self.task = SaliencyTask()

    def __call__(self, head_output: torch.Tensor, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        target = salient(batch).float().unsqueeze(1)  # (B, 1, S, S)
        logits = self.task.read_output(head_output).on_canvas(tuple(target.shape[-2:]))
        loss = F.binary_cross_entropy_with_logits(logits, target)
        return loss, {"bce": loss.detach()}
