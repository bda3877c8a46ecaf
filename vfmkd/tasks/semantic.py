"""Semantic segmentation: per-pixel class logits (``semantic_head``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vfmkd.core.registry import TASKS
from vfmkd.tasks.base import Task


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


@TASKS.register("semantic")
class SemanticTask(Task):
    """A class per pixel; loads the semantic masks."""

    name = "semantic"
    label_kinds = frozenset({"semantic"})
    default_loss = "semantic_segmentation"
    semantic_classes = True
    dense_logits = True
    teacher_tasks = ("semantic",)
    output_type = SemanticOutput

    def read_output(self, raw: Any) -> SemanticOutput:
        return SemanticOutput.read(raw)
