"""An example user task, added from outside vfmkd in one file (docs/adding_a_task.md walks through it):
saliency, "is this pixel part of any labelled thing", trained from the semantic masks. The file
holds the task (its typed output, the labels it loads, its loss), a head for it and the loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS, LOSSES, TASKS
from vfmkd.datasets.records import Batch
from vfmkd.distillation.losses.task import TaskLoss
from vfmkd.models.heads import BaseHead
from vfmkd.tasks import DenseOutput, Task


@dataclass
class SaliencyOutput(DenseOutput):
    """Saliency logits (B, 1, S/stride, S/stride); sigmoid > 0.5 is salient."""


@TASKS.register("saliency")
class SaliencyTask(Task):
    """Salient (any semantic class) vs unlabeled pixels; reads the semantic masks."""

    name = "saliency"
    label_kinds = frozenset({"semantic"})
    default_loss = "saliency_bce"
    dense_logits = True
    output_type = SaliencyOutput

    def read_output(self, raw: Any) -> SaliencyOutput:
        return SaliencyOutput.read(raw)


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
    """BCE of the upsampled logits against ``batch.semantic > 0`` (B, S, S)."""

    def __init__(self, head: nn.Module) -> None:
        self.task = SaliencyTask()

    def __call__(self, head_output: torch.Tensor, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        logits = self.task.read_output(head_output).logits
        target = (batch.semantic > 0).float().unsqueeze(1)  # (B, 1, S, S)
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        return loss, {"bce": loss.detach()}
