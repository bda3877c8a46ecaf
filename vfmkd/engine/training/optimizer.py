"""The optimizer of a run (AdamW or SGD, no weight decay on 1-d tensors) and its LR schedule over
optimizer steps (warm-up, then each stage's cosine: :mod:`vfmkd.engine.training.stages`)."""
from __future__ import annotations

from typing import List, Sequence

import torch

from vfmkd.core.config_schema import TrainConfig
from vfmkd.engine.training.stages import Stage, staged_lr_lambda


def make_optimizer(params: List[torch.nn.Parameter], optimizer: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (1-d tensors), as YOLO and ViT recipes do.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))


def staged_scheduler(optimizer: torch.optim.Optimizer, stages: Sequence[Stage], train: TrainConfig,
                     batches_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's LR schedule over optimizer steps: ``train.warmup_epochs`` (or ``warmup_iters`` steps) of
    warm-up, then each stage's cosine (:func:`staged_lr_lambda`)."""
    steps_per_epoch = -(-batches_per_epoch // train.accumulate)  # ceil: a partial group still steps
    warmup = train.warmup_epochs * steps_per_epoch if train.warmup_epochs else train.warmup_iters
    return torch.optim.lr_scheduler.LambdaLR(optimizer, staged_lr_lambda(stages, steps_per_epoch, warmup, train.lr))
