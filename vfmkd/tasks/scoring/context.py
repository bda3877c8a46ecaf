"""What a task's ``build_scorer`` is given besides its head's name (:class:`ScoringContext`), and what a
scorer is (:class:`Scorer`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Tuple

import torch

from vfmkd.datasets.records import Batch

#: ``(batch, teacher_targets, grid_hw, stride, device) -> prompts or None``: the teacher masks of a batch
#: paired with its detection boxes on the student grid (``rows``, ``batch_idx``, ``boxes``, ``logits``,
#: ``valid``); the engine hands in distillation's ``prompts_on_grid`` (tasks sit below distillation)
TeacherPrompts = Callable[[Batch, Any, Tuple[int, int], int, torch.device], Optional[Any]]


@dataclass(frozen=True)
class ScoringContext:
    """The split's class names and the evaluation settings (``eval.conf``, ``eval.iou``,
    ``eval.max_det``: NMS of box heads). ``box_names`` detection class id -> name; ``semantic_names``
    semantic index -> name, 0 included (None: the dataset has no semantic labels); ``teacher_prompts``
    pairs the teachers' masks with the batch's boxes (the engine hands in distillation's
    ``prompts_on_grid``; None: no alignment with a teacher is scored); ``data_root`` / ``split``: the
    evaluated split (a scorer that reads its own ground truth, e.g. panoptic annotations; None: unknown)."""

    box_names: Mapping[int, str]
    semantic_names: Optional[Mapping[int, str]] = None
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    teacher_prompts: Optional[TeacherPrompts] = None
    data_root: Optional[Any] = None
    split: Optional[str] = None


class Scorer(Protocol):
    """One head's metrics over a split: ``update`` per evaluation batch, ``result()`` at the end (plain
    numbers and per-class tables). A scorer with ``wants_targets = True`` is given the batch's teacher
    targets too (``update(out, batch, targets)``); one with ``bind(model)`` is given the model first."""

    def update(self, out: Any, batch: Any, *args: Any) -> None:
        ...

    def result(self) -> Mapping[str, Any]:
        ...
