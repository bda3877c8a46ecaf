"""Small building blocks of a run: seeding, loaders, optimizer (devices: :mod:`vfmkd.core.device`)."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

import vfmkd.models.heads  # noqa: F401  (registers the built-in heads)
from vfmkd.core.config import read_yaml, resolve_path
from vfmkd.core.errors import ConfigError
from vfmkd.datasets import collate_samples
from vfmkd.distillation.cached import CachedTargetsDataset, collate_distill
from vfmkd.engine.builders.data import head_classes
from vfmkd.tasks import tasks_of
from vfmkd.utils.logging import get_logger
from vfmkd.utils.stop_signals import ignore_in_worker


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_names(root: str, num_classes: int) -> Dict[int, str]:
    """Names from the dataset's ``object_detection/config.yaml``, else numbers."""
    path = resolve_path(Path(root) / "object_detection" / "config.yaml")
    names = read_yaml(path).get("names", {}) if path.is_file() else {}
    return {i: str(names.get(i, i)) for i in range(num_classes)}


def detection_classes(heads: Mapping[str, Mapping[str, Any]]) -> int:
    """Box class count: ``num_classes`` of the detection (or instance) heads, which must agree; 80 (COCO)
    for a model without box heads (its box labels still prompt mask teachers)."""
    box_heads = [name for name, task in tasks_of(head_classes(heads)).items() if task.box_classes]
    counts = {name: int(heads[name].get("num_classes", 80)) for name in box_heads}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"model.heads: the box heads disagree on num_classes ({counts}); they read the same box "
                          "labels")
    return next(iter(counts.values()), 80)


def worker_count(requested: int) -> int:
    """``data.num_workers``, clamped to the CPU cores this process may use (more workers than cores
    only thrash), with a warning that says so."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cores:
        get_logger().warning("data.num_workers=%d but this machine has %d CPU core(s): using %d workers", requested,
                             cores, cores)
        return cores
    return requested


def build_loader(dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int, sampler=None) -> DataLoader:
    """Batches of :class:`Batch` (a plain dataset) or :class:`DistillBatch` (cached targets attached)."""
    generator = torch.Generator().manual_seed(seed)
    # Augmenting datasets read their epoch at fork time: workers must be re-created every epoch.
    persistent = num_workers > 0 and getattr(dataset, "augment", None) is None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_distill if isinstance(dataset, CachedTargetsDataset) else collate_samples,
        generator=generator,
        persistent_workers=persistent,
        worker_init_fn=ignore_in_worker if num_workers > 0 else None,  # SIGINT/SIGTERM are the main process's
    )


def make_optimizer(params: List[torch.nn.Parameter], optimizer: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (1-d tensors), as YOLO and ViT recipes do.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
