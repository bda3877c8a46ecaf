"""Query panoptic segmentation: a set of queries, each a class over things + stuff + no-object, a mask and
an IoU score (``rapsam_head``), turned into panoptic segments by the queries themselves (no instance +
semantic merge). Named ``panoptic_query`` (not ``panoptic``) because the instance + semantic pair of
heads gives a panoptic output too; this task is the one whose head alone does."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Tuple

import torch

from vfmkd.core.registry import TASKS
from vfmkd.datasets.records import Batch
from vfmkd.tasks.base import Task
from vfmkd.tasks.pictures import PanelRow, PictureContext, Prediction
from vfmkd.tasks.scoring.context import ScoringContext
from vfmkd.tasks.scoring.query_panoptic import QueryPanopticRule, QueryPanopticScorer, class_map, query_panoptic


@dataclass
class QueryPanopticOutput:
    """A query head's output, train and eval alike: ``class_logits`` (B, Q, C + 1) over the C class
    indices (the semantic table's, 0 = unlabeled) and, last, "no object"; ``mask_logits`` (B, Q, h, w)
    on the head's stride-8 grid; ``iou`` (B, Q) the predicted IoU of each mask in [0, 1]; ``raw``
    the head's tuple as it came."""

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    iou: torch.Tensor
    raw: Any
    #: the fields an export writes as graph outputs, in this order (vfmkd.engine.export.student_graph)
    export_parts: ClassVar[Tuple[str, ...]] = ("class_logits", "mask_logits", "iou")

    @classmethod
    def read(cls, raw: Any) -> QueryPanopticOutput:
        ok = isinstance(raw, (tuple, list)) and len(raw) == 3 and all(torch.is_tensor(t) for t in raw)
        if not ok or raw[0].ndim != 3 or raw[1].ndim != 4 or raw[2].ndim != 2:
            got = [tuple(t.shape) for t in raw] if ok else type(raw).__name__
            raise ValueError(f"{cls.__name__} reads (class logits (B, Q, C+1), mask logits (B, Q, h, w), iou (B, Q)), "
                             f"got {got}")
        return cls(raw[0], raw[1], raw[2], raw)


@TASKS.register("panoptic_query")
class QueryPanopticTask(Task):
    """Panoptic segments from queries; loads the instance masks (things) and the semantic masks (stuff).
    Its mask logits are per-pixel logits read at normalised points by its loss and upsampled by its
    scorer (``dense_logits``: they stay right when DSRL downsizes the input)."""

    name = "panoptic_query"
    label_kinds = frozenset({"instances", "semantic"})
    semantic_classes = True
    default_loss = "query_panoptic"
    dense_logits = True
    teacher_tasks = ("panoptic_query",)
    output_type = QueryPanopticOutput

    primary_metric = ("PQ", "PQ")
    # Ranks first (below promptable's 0): its PQ scores things and stuff in one output, the metric
    # primary_metric already prefers over every head when instance + semantic heads are merged; a model that
    # also has a promptable head (RapSAM's two uses) keeps best.pt on full-scene PQ, not prompted-mask mIoU.
    best_rank = -1

    def read_output(self, raw: Any) -> QueryPanopticOutput:
        return QueryPanopticOutput.read(raw)

    def build_scorer(self, head: str, context: ScoringContext) -> QueryPanopticScorer:
        if context.semantic_names is None:
            raise ValueError("a panoptic_query head needs the semantic class names (dataset built with semantic=True)")
        return QueryPanopticScorer(head, context.semantic_names, context.data_root, context.split,
                                   read_output=self.read_output)

    def picture_row(self, head: str, output: QueryPanopticOutput, batch: Batch,
                    context: PictureContext) -> PanelRow:
        """Student: the class map of its panoptic inference (the head's thresholds); ground truth: the
        semantic labels; no teacher column (a mask teacher gives no class map)."""
        if batch.semantic is None:
            raise ValueError(f"head {head}: drawing a panoptic_query head needs semantic labels (dataset built "
                             "with semantic=True)")
        settings = getattr(context.head_module, "panoptic_settings", None)
        rule = QueryPanopticRule(**settings) if settings else QueryPanopticRule()
        labels = torch.stack([class_map(query_panoptic(output.class_logits[i].detach(),
                                                       output.mask_logits[i].detach(), output.iou[i].detach(),
                                                       None, rule)) for i in range(len(batch))])
        return PanelRow(head, Prediction.semantic(labels=labels), None,
                        Prediction.semantic(labels=batch.semantic.cpu()), class_names=context.semantic_names)
