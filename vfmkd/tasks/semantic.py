"""Semantic segmentation: per-pixel class logits (``semantic_head``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vfmkd.core.registry import TASKS
from vfmkd.datasets.records import Batch
from vfmkd.tasks.base import Task
from vfmkd.tasks.pictures import PanelRow, PictureContext, Prediction
from vfmkd.tasks.scoring.context import ScoringContext
from vfmkd.tasks.scoring.panoptic_metrics import STUFF
from vfmkd.tasks.scoring.seg_metrics import SemanticScorer


@dataclass
class DenseOutput:
    """Per-pixel logits (B, K, S/stride, S/stride) of a dense head, the same in train and eval
    (the loss and the scorer upsample them)."""

    logits: torch.Tensor

    @classmethod
    def read(cls, raw: Any) -> DenseOutput:
        if not isinstance(raw, torch.Tensor) or raw.ndim != 4:
            got = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ValueError(f"{cls.__name__} reads a (B, K, H, W) logit tensor, got {got}")
        return cls(raw)


@dataclass
class SemanticOutput(DenseOutput):
    """Class logits (B, K, H, W); channel 0 is "unlabeled" (ignored by the loss)."""

    def labels(self) -> torch.Tensor:
        """(B, H, W) int64: the most likely class of every cell."""
        return self.logits.argmax(1)


class DenseTask(Task):
    """A task whose head gives per-pixel logits (B, K, H, W): its ``output_type`` is a
    :class:`DenseOutput`, read as is, and its loss and scorer upsample the logits to the labels."""

    dense_logits = True
    output_type = DenseOutput

    def read_output(self, raw: Any) -> DenseOutput:
        return self.output_type.read(raw)


@TASKS.register("semantic")
class SemanticTask(DenseTask):
    """A class per pixel; loads the semantic masks."""

    name = "semantic"
    label_kinds = frozenset({"semantic"})
    default_loss = "semantic_segmentation"
    semantic_classes = True
    teacher_tasks = ("semantic",)
    output_type = SemanticOutput

    primary_metric = ("mIoU", "mIoU")
    best_rank = 2
    panoptic_part = STUFF

    def build_scorer(self, head: str, context: ScoringContext) -> SemanticScorer:
        if context.semantic_names is None:
            raise ValueError("a semantic head needs the semantic class names (dataset built with semantic=True)")
        return SemanticScorer(context.semantic_names, head=head, read_output=self.read_output)

    def picture_row(self, head: str, output: SemanticOutput, batch: Batch, context: PictureContext) -> PanelRow:
        """Student: the class probabilities; ground truth: the semantic labels; teacher: the union of the
        teacher's masks per class channel (what the output distillation compares), else its masks."""
        if batch.semantic is None:
            raise ValueError(f"head {head}: drawing a semantic head needs semantic labels (dataset built with "
                             "semantic=True)")
        maps = context.teacher_class_maps(output.logits)
        teacher = Prediction.semantic(labels=teacher_labels(maps)) if maps is not None else context.teacher_masks
        return PanelRow(head, Prediction.semantic(probs=output.logits.float().softmax(1).cpu()), teacher,
                        Prediction.semantic(labels=batch.semantic.cpu()), class_names=context.semantic_names)


def teacher_labels(probs: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) per-class teacher probabilities -> (B, h, w) labels: the likeliest class, 0 (not drawn)
    where no class's mask covers the cell."""
    labels = probs.argmax(1)
    labels[probs.amax(1) <= 0.5] = 0
    return labels
