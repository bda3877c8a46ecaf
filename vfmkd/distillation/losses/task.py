"""The base of task losses: what trains a student head on the batch's labels."""
from __future__ import annotations

from vfmkd.core.registry import LOSSES
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
