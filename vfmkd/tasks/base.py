"""The task contract: what a head is for, asked instead of compared as a string.

A head (a :class:`~vfmkd.models.heads.base.BaseHead`) carries its task's NAME (``task = "instance"``;
models sit below tasks and cannot import them); :func:`task_of` looks the :class:`Task` up in
:data:`~vfmkd.core.registry.TASKS`. A task bundles what the rest of vfmkd asks about it:

- ``label_kinds``: the per-pixel label kinds the dataset must load for it (a subset of
  :data:`vfmkd.datasets.records.LABEL_KINDS`; boxes are always loaded);
- ``box_classes`` / ``semantic_classes``: whether its head's ``num_classes`` is the box labels' class
  count / must cover the dataset's semantic class table;
- ``default_loss``: the LOSSES name that trains such a head when the config names none;
- ``canvas_stride``: whether its outputs answer in input (canvas) pixels on the stride grid of the
  padded canvas (boxes, prototypes: a resolution change must keep the canvas);
- ``dense_logits``: whether its outputs are per-pixel logits that the loss and the scorer upsample to
  the label size (they stay right when DSRL downsizes the input);
- ``teacher_tasks``: the tasks of a vfmkd teacher's heads whose outputs can teach it;
- :meth:`Task.read_output`: the head's raw train/eval output as the task's typed output record;
- :meth:`Task.build_scorer`: its head's scorer (:mod:`vfmkd.tasks.scoring`); ``primary_metric`` (the
  metric key of that scorer's result and its short name in checkpoint file names), :meth:`Task.fitness`
  (the number that orders checkpoints) and ``best_rank`` (the head whose task ranks lowest decides
  best.pt); ``panoptic_part``: the part of a panoptic output its head gives (things, stuff, or None);
- :meth:`Task.picture_row`: what its head's row of the evaluation pictures shows (student prediction,
  ground truth, teacher), as :mod:`vfmkd.tasks.pictures` records the engine draws.

A new task is one file: subclass :class:`Task`, register it with ``@TASKS.register("name")`` and give
a head ``task = "name"`` (docs/adding_a_task.md).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Dict, FrozenSet, Iterable, Mapping, Optional, Tuple

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import TASKS
from vfmkd.datasets.records import LABEL_KINDS, Batch
from vfmkd.tasks.pictures import PanelRow, PictureContext
from vfmkd.tasks.scoring.context import Scorer, ScoringContext


class Task(ABC):
    """One task (a class attribute per property, one method to read a head's output)."""

    #: the registry name, the ``task`` attribute of its heads
    name: ClassVar[str] = ""
    #: per-pixel label kinds the dataset loads for it ("instances", "semantic", "binary")
    label_kinds: ClassVar[FrozenSet[str]] = frozenset()
    #: True when the head's ``num_classes`` is the box labels' class count
    box_classes: ClassVar[bool] = False
    #: True when the head's ``num_classes`` must cover the dataset's semantic class table
    semantic_classes: ClassVar[bool] = False
    #: the LOSSES name of its task loss
    default_loss: ClassVar[str] = ""
    #: True when its outputs are in canvas pixels on the canvas' stride grid
    canvas_stride: ClassVar[bool] = False
    #: True when its outputs are per-pixel logits upsampled to the label size by its loss and scorer
    dense_logits: ClassVar[bool] = False
    #: tasks of a vfmkd teacher's heads that can teach a head of this task (output distillation)
    teacher_tasks: ClassVar[Tuple[str, ...]] = ()
    #: the typed output record :meth:`read_output` returns
    output_type: ClassVar[type] = object
    #: (metric key of its scorer's result, short name in file names): what picks best.pt
    primary_metric: ClassVar[Tuple[str, str]] = ("", "")
    #: which head's metric picks best.pt when a model has several: the lowest rank (ties: the first head)
    best_rank: ClassVar[int] = 100
    #: the part of a panoptic output its head gives (:data:`vfmkd.tasks.scoring.panoptic_metrics.THINGS`
    #: or ``STUFF``), None when it gives none
    panoptic_part: ClassVar[Optional[str]] = None

    @abstractmethod
    def read_output(self, raw: Any) -> Any:
        """The head's raw train or eval output (what its ``forward`` returns) as :attr:`output_type`."""

    @abstractmethod
    def build_scorer(self, head: str, context: ScoringContext) -> Scorer:
        """The scorer of head ``head`` (its name in ``StudentOutput.heads``) over an evaluation split."""

    def fitness(self, scores: Mapping[str, Any]) -> float:
        """The number that orders checkpoints, from its scorer's result (default: the primary metric)."""
        return float(scores[self.primary_metric[0]])

    @abstractmethod
    def picture_row(self, head: str, output: Any, batch: Batch, context: PictureContext) -> PanelRow:
        """Head ``head``'s row of the evaluation pictures: its typed ``output`` (:meth:`read_output`) and
        the ground truth of ``batch`` as :class:`~vfmkd.tasks.pictures.Prediction` s, and the teacher
        column the engine computed (``context``) where one applies."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def get_task(name: str) -> Task:
    """The registered task ``name`` (ConfigError naming the registered tasks when there is none)."""
    return TASKS.get(name)()


def task_of(head: Any) -> Task:
    """The task of ``head`` (a head module or class): its ``task`` name looked up in TASKS."""
    name = getattr(head, "task", None)
    if not isinstance(name, str):
        what = head.__name__ if isinstance(head, type) else type(head).__name__
        raise ConfigError(f"head {what} has no task name: subclass vfmkd.models.heads.base.BaseHead and set "
                          f"task = one of {', '.join(TASKS.names())}")
    try:
        return get_task(name)
    except ConfigError as err:
        what = head.__name__ if isinstance(head, type) else type(head).__name__
        raise ConfigError(f"head {what}: {err}") from err


def tasks_of(heads: Mapping[str, Any]) -> Dict[str, Task]:
    """Head name -> task, for head modules or classes (e.g. ``model.heads``)."""
    return {name: task_of(head) for name, head in heads.items()}


def label_kinds_of(tasks: Iterable[Task]) -> FrozenSet[str]:
    """The label kinds a dataset must load for all of ``tasks`` (ConfigError for a kind it cannot load)."""
    tasks = list(tasks)
    for task in tasks:
        unknown = sorted(set(task.label_kinds) - set(LABEL_KINDS))
        if unknown:
            raise ConfigError(f"task '{task.name}' asks for label kind(s) {', '.join(unknown)}, which the dataset "
                              f"cannot load; it loads {', '.join(LABEL_KINDS)} (and the boxes, always)")
    return frozenset().union(*(t.label_kinds for t in tasks))


def canvas_stride_heads(heads: Mapping[str, Any]) -> FrozenSet[str]:
    """Names of the heads (modules or classes) whose task answers in canvas pixels: what
    :meth:`~vfmkd.models.unified_model.UnifiedModel.from_config` builds with canvas strides."""
    return frozenset(name for name, task in tasks_of(heads).items() if task.canvas_stride)
