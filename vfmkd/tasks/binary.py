"""Binary segmentation: one foreground logit per pixel (``binary_head``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vfmkd.core.registry import TASKS
from vfmkd.tasks.base import Task
from vfmkd.tasks.semantic import DenseOutput


@dataclass
class BinaryOutput(DenseOutput):
    """Foreground logits (B, 1, H, W) (logit > 0, i.e. sigmoid > 0.5, is foreground)."""

    def probabilities(self) -> torch.Tensor:
        """(B, 1, H, W) foreground probabilities."""
        return self.logits.sigmoid()


@TASKS.register("binary")
class BinaryTask(Task):
    """Foreground vs background (the classes of ``data.binary_classes``); loads the binary masks."""

    name = "binary"
    label_kinds = frozenset({"binary"})
    default_loss = "binary_segmentation"
    dense_logits = True
    teacher_tasks = ("binary",)
    output_type = BinaryOutput

    def read_output(self, raw: Any) -> BinaryOutput:
        return BinaryOutput.read(raw)
