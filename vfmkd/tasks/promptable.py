"""Promptable segmentation: image embeddings a prompted mask decoder reads (``sam_decoder``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from ultralytics.utils.ops import xywh2xyxy

from vfmkd.core.registry import TASKS
from vfmkd.datasets.records import Batch
from vfmkd.tasks.base import Task
from vfmkd.tasks.pictures import PanelRow, PictureContext, Prediction, split_by_image
from vfmkd.tasks.scoring.context import ScoringContext
from vfmkd.tasks.scoring.promptable_metrics import PromptableScorer, decode_boxes


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

    primary_metric = ("mIoU", "boxmIoU")
    best_rank = 0  # what a promptable student is for

    def read_output(self, raw: Any) -> PromptableOutput:
        if not isinstance(raw, torch.Tensor) or raw.ndim != 4:
            raise ValueError(f"PromptableOutput reads (B, E, h, w) embeddings, got {type(raw).__name__}")
        return PromptableOutput(raw)

    def build_scorer(self, head: str, context: ScoringContext) -> PromptableScorer:
        """The head module comes from the model ``evaluate`` binds."""
        return PromptableScorer(context.box_names, head=head, teacher_prompts=context.teacher_prompts,
                                read_output=self.read_output)

    def picture_row(self, head: str, output: PromptableOutput, batch: Batch, context: PictureContext) -> PanelRow:
        """Prompts = the ground-truth instance boxes (drawn on every column); student = the masks the
        head decodes for them; teacher = its masks for the view's detection boxes; ground truth = the
        instance masks."""
        n, size = len(batch), batch.images.shape[-1]
        inst, embeddings = batch.instances, output.embeddings
        if inst is None or context.head_module is None:
            raise ValueError(f"head {head}: drawing a promptable head needs instance labels and the model (evaluate "
                             "binds it)")
        idx = inst.batch_idx.view(-1).long()
        boxes = xywh2xyxy(inst.bboxes.float()) * size
        logits, scores = decode_boxes(context.head_module, embeddings, idx.to(embeddings.device),
                                      boxes.to(embeddings.device))
        idx_cpu, cls = idx.cpu(), inst.cls.view(-1).cpu()
        per_boxes = split_by_image(boxes.cpu(), idx_cpu, n)
        per_cls = split_by_image(cls, idx_cpu, n)
        student = Prediction.instances(split_by_image(logits.sigmoid().cpu(), idx_cpu, n), per_cls, per_boxes,
                                       split_by_image(scores.cpu(), idx_cpu, n))
        target = Prediction.instances([m > 0.5 for m in split_by_image(inst.masks.cpu(), idx_cpu, n)], per_cls,
                                      per_boxes)
        return PanelRow(f"{head} (GT box prompts)", student, context.teacher_masks, target,
                        class_names=context.box_names)
