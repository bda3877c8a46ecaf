"""The base of task losses: what trains a student head on the batch's labels, and the helpers that
keep a task loss to the labelled images of a batch (``Batch.labelled``: an unlabelled image is
unknown, not empty)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import torch

from vfmkd.core.registry import LOSSES
from vfmkd.datasets.records import Batch, DetectionBatch
from vfmkd.distillation.terms import LossEntry, LossTerm, TermContext

#: The head a task loss entry reads when it names none (its term logs as ``loss_det``).
DEFAULT_HEAD = "detection"


class TaskLoss:
    """A task loss is called as ``loss(head_output, batch)`` with the training output of the head
    its entry names (``head:``, default ``detection``) and the whole ``Batch``, and returns
    ``(scalar loss, {part: detached value})``; its constructor takes that head module as ``head``.

    :meth:`build_term` (the hook every loss class has) hands it the head and logs it as
    ``loss_det`` (the ``detection`` head) or ``loss_<head>``."""

    kind = "task"

    @classmethod
    def build_term(cls, entry: LossEntry, context: TermContext) -> LossTerm:
        head = entry.kwargs.pop("head", DEFAULT_HEAD)
        module = LOSSES.build(entry.type, where=entry.where, head=context.model_head(entry.where, head), **entry.kwargs)
        return entry.term(cls.kind, module, "loss_det" if head == DEFAULT_HEAD else f"loss_{head}", head)


def graph_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """0, connected to every tensor's graph (so DDP sees every parameter used and backward works)."""
    return sum((t.float() * 0).sum() for t in tensors)  # type: ignore[return-value]


def batch_rows(value: Any, keep: torch.Tensor) -> Any:
    """The images ``keep`` (K,) of a head output: a (B, ...) tensor, a list/tuple of them (kept as that type:
    ultralytics tells YOLO26-seg's ``(proto, semseg)`` apart by it) or a dict of those, nested."""
    if torch.is_tensor(value):
        return value[keep.to(value.device)]
    if isinstance(value, Mapping):
        return {k: batch_rows(v, keep) for k, v in value.items()}
    return type(value)(batch_rows(v, keep) for v in value)


def labelled_images(head_output: Mapping[str, Any], labelled: torch.Tensor,
                    batch_idx: torch.Tensor) -> Tuple[Dict[str, Any], torch.Tensor, torch.Tensor]:
    """A head's training output and its targets restricted to the labelled images of the batch.

    ``head_output``: {name: (B, ...) tensor, a list/tuple of them or such a dict (an end-to-end head's
    ``one2many``/``one2one`` branches)}; ``labelled`` (B,) bool; ``batch_idx`` (N,)
    image of each target row. Returns the output sliced to the labelled images, the (N,) bool rows of
    those images and their (M,) float image index among the labelled images (ultralytics' batch_idx)."""
    labelled = labelled.to(batch_idx.device).bool()
    sliced = batch_rows(head_output, labelled.nonzero().view(-1))
    new_index = torch.cumsum(labelled.long(), 0) - 1  # old image index -> position among the labelled
    old = batch_idx.long().view(-1)
    rows = labelled[old]
    return sliced, rows, new_index[old[rows]].float()


def labelled_boxes(head_output: Mapping[str, Any], batch: Batch) -> Tuple[Mapping[str, Any], DetectionBatch, int]:
    """(head output, boxes, images) of the images whose boxes are labels: the whole batch, or, when it
    holds unlabelled images (``batch.labelled``), only the labelled ones (their empty boxes mean
    "unknown", and a box loss must not learn "no objects" from them); images may be 0."""
    boxes, labelled = batch.boxes, batch.labelled
    if labelled is None or bool(labelled.all()):
        return head_output, boxes, len(batch)
    sliced, rows, index = labelled_images(head_output, labelled, boxes.batch_idx)
    part = DetectionBatch(cls=boxes.cls[rows], bboxes=boxes.bboxes[rows], batch_idx=index,
                          label_index=boxes.label_index[rows])  # type: ignore[index]
    return sliced, part, int(labelled.sum())
