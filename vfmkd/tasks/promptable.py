"""Promptable segmentation: image embeddings a prompted mask decoder reads (``sam_decoder``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vfmkd.core.registry import TASKS
from vfmkd.tasks.base import Task


@dataclass
class PromptableOutput:
    """Image embeddings (B, E, S/16, S/16) (SAM's ``image_embeddings`` layout), train and eval alike;
    the head's ``decode(embeddings, batch_idx, boxes=..., points=...)`` prompts them."""

    embeddings: torch.Tensor


@TASKS.register("promptable")
class PromptableTask(Task):
    """Masks for box/point prompts; loads the instance polygons (ground-truth prompts and masks).
    Trained by distillation from SAM (``prompt_distill``, with ``embedding_distill``)."""

    name = "promptable"
    label_kinds = frozenset({"instances"})
    default_loss = "prompt_distill"
    output_type = PromptableOutput

    def read_output(self, raw: Any) -> PromptableOutput:
        if not isinstance(raw, torch.Tensor) or raw.ndim != 4:
            raise ValueError(f"PromptableOutput reads (B, E, h, w) embeddings, got {type(raw).__name__}")
        return PromptableOutput(raw)
