"""The module one training step trains: the student and the distiller (its adapters) as one, which is
what DistributedDataParallel wraps under torchrun."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from vfmkd.distillation.resolution import dual_resolution_student


class TrainStep(torch.nn.Module):
    """The modules a training step trains, as one (what DDP wraps): ``forward(batch, targets,
    autocast, teacher_scale)`` runs the student on ``batch.images`` (B, 3, S, S) and returns the distiller's
    :class:`LossResult` (a NaN/inf is reported in ``problem``, not raised: ranks decide together).
    ``student``: how the step runs the model (dual-path resolution distillation runs it twice)."""

    def __init__(self, model: torch.nn.Module, distiller: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.distiller = model, distiller
        self.student = dual_resolution_student(model, distiller)

    def forward(self, batch: Any, targets: Dict[str, Any], autocast: Any,
                teacher_scale: Optional[Dict[str, float]] = None) -> Any:
        with autocast:
            out = self.student(batch.images)
        return self.distiller(out, batch, targets, raise_non_finite=False, teacher_scale=teacher_scale)


def train_step_module(model: torch.nn.Module, distiller: torch.nn.Module, ctx: Any) -> torch.nn.Module:
    """:class:`TrainStep`, DDP-wrapped when ``ctx`` (the run's distributed context) has several ranks. DDP
    averages the student's and adapters' gradients across ranks; stages and distill_interval leave some
    parameters unused in a step, hence ``find_unused_parameters``."""
    step = TrainStep(model, distiller)
    if not ctx.enabled:
        return step
    device = ctx.device
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)
