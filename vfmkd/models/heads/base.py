"""The head contract the engine, the scorers and the output pairings read."""
from __future__ import annotations

from typing import ClassVar, List, Optional

from torch import nn


class BaseHead(nn.Module):
    """A task head: ``forward(feats)`` on the neck's levels (name -> (B, C_l, H_l, W_l)) returns the
    task's raw output (ultralytics' layouts where the head wraps an ultralytics module: its losses
    and export read them); ``vfmkd.tasks.task_of(head).read_output(out)`` gives the typed record.

    ``task``: the name of its task in :data:`~vfmkd.core.registry.TASKS` (models sit below tasks, so
    the head carries the name and layers above look the task up). ``num_classes``: its class count
    (None for a head without classes, e.g. a promptable decoder). ``level_names``: the neck levels
    it reads, in order. ``set_prediction``: its eval output is an unordered set of queries (a DETR),
    not anchor-aligned (export compares it as a set; anchor-wise output distillation refuses it).
    """

    task: ClassVar[str] = ""
    num_classes: Optional[int] = None
    level_names: List[str]
    set_prediction: ClassVar[bool] = False
