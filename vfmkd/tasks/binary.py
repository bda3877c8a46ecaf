"""Binary segmentation: one foreground logit per pixel (``binary_head``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vfmkd.core.registry import TASKS
from vfmkd.datasets.records import Batch
from vfmkd.tasks.pictures import PanelRow, PictureContext, Prediction
from vfmkd.tasks.scoring.context import ScoringContext
from vfmkd.tasks.scoring.seg_metrics import BinaryScorer
from vfmkd.tasks.semantic import DenseOutput, DenseTask


@dataclass
class BinaryOutput(DenseOutput):
    """Foreground logits (B, 1, H, W) (logit > 0, i.e. sigmoid > 0.5, is foreground)."""

    def probabilities(self) -> torch.Tensor:
        """(B, 1, H, W) foreground probabilities."""
        return self.logits.sigmoid()


@TASKS.register("binary")
class BinaryTask(DenseTask):
    """Foreground vs background (the classes of ``data.binary_classes``); loads the binary masks."""

    name = "binary"
    label_kinds = frozenset({"binary"})
    default_loss = "binary_segmentation"
    teacher_tasks = ("binary",)
    output_type = BinaryOutput

    primary_metric = ("dice", "Dice")
    best_rank = 3

    def build_scorer(self, head: str, context: ScoringContext) -> BinaryScorer:
        return BinaryScorer(head=head, read_output=self.read_output)

    def picture_row(self, head: str, output: BinaryOutput, batch: Batch, context: PictureContext) -> PanelRow:
        """Student: the foreground probability; ground truth: the binary mask; teacher: the union of the
        teacher's masks of the foreground classes (what the output distillation compares), else its masks."""
        if batch.binary is None:
            raise ValueError(f"head {head}: drawing a binary head needs binary labels (data.binary_classes)")
        maps = context.teacher_class_maps(output.logits)
        teacher = Prediction.binary(maps[:, 0]) if maps is not None else context.teacher_masks
        return PanelRow(head, Prediction.binary(output.logits.float().sigmoid().cpu()), teacher,
                        Prediction.binary_target(batch.binary.cpu()))
