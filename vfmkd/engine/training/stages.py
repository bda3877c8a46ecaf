"""Staged training: a run as a list of stages, each with its epochs, active losses, weights and LR.

E.g. stage 1 distils features only (the task loss would drown the feature loss early on), stage 2
trains every loss: the design's "progressive training". Without ``train.stages`` a run is one stage
with every loss. The LR follows linear warm-up then cosine decay to 1 % within each stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from vfmkd.core.config_schema import TrainConfig
from vfmkd.core.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """Epochs ``first_epoch`` .. ``first_epoch + epochs - 1`` (1-based) train the ``losses`` (None:
    all) with ``weights`` overriding the configured loss weights, at base rate ``lr``."""

    name: str
    epochs: int
    first_epoch: int
    lr: float
    losses: Optional[Tuple[str, ...]] = None
    weights: Dict[str, float] = field(default_factory=dict)

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "epochs": [self.first_epoch, self.last_epoch], "lr": self.lr,
                "losses": list(self.losses) if self.losses is not None else "all", "weights": dict(self.weights)}


def build_stages(train: TrainConfig) -> List[Stage]:
    """Stages from ``train.stages`` (or one stage of ``train.epochs``)."""
    if not train.stages:
        return [Stage("train", int(train.epochs or 0), 1, float(train.lr))]
    stages, first = [], 1
    for i, entry in enumerate(train.stages):
        if entry.epochs < 1:
            raise ConfigError(f"train.stages.{i}.epochs must be >= 1, got {entry.epochs}")
        stages.append(Stage(
            name=entry.name or f"stage{i + 1}", epochs=int(entry.epochs), first_epoch=first,
            lr=float(entry.lr or train.lr), losses=tuple(entry.losses) if entry.losses is not None else None,
            weights={k: float(v) for k, v in entry.weights.items()}))
        first += int(entry.epochs)
    return stages


def stage_of(stages: Sequence[Stage], epoch: int) -> Stage:
    return next(s for s in stages if s.first_epoch <= epoch <= s.last_epoch)


def staged_lr_lambda(stages: Sequence[Stage], steps_per_epoch: int, warmup_iters: int,
                     base_lr: float) -> Callable[[int], float]:
    """LambdaLR factor (of ``base_lr``) per optimizer step: within each stage, linear warm-up over
    min(warmup_iters, a third of the stage), then cosine decay to 1 % of the stage's rate."""
    spans: List[Tuple[int, int, float]] = []  # (first step, steps, stage lr / base lr)
    start = 0
    for s in stages:
        steps = s.epochs * steps_per_epoch
        spans.append((start, steps, s.lr / base_lr))
        start += steps

    def factor(step: int) -> float:
        first, steps, scale = next((sp for sp in spans if step < sp[0] + sp[1]), spans[-1])
        local = step - first
        warmup = max(1, min(warmup_iters, max(1, steps // 3)))
        if local < warmup:
            return scale * (local + 1) / warmup
        progress = (local - warmup) / max(1, steps - warmup)
        return scale * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    return factor


def enter_stage(stage: Stage, distiller: Any, log: Any) -> Stage:
    """Switch the distiller to ``stage``'s losses and weights and say so; returns the stage."""
    distiller.set_stage(stage.losses, stage.weights)
    log.info("stage %s: epochs %d-%d, losses %s, lr %g", stage.name, stage.first_epoch, stage.last_epoch,
             ", ".join(stage.losses) if stage.losses is not None else "all", stage.lr)
    return stage
