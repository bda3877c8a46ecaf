"""Small building blocks of a training run: device, seeding, loaders, optimizer, schedule."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader

from vfmkd.core.config import read_yaml, resolve_path
from vfmkd.core.errors import ConfigError
from vfmkd.datasets import collate_detection


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_names(data_cfg: Dict[str, Any], num_classes: int) -> Dict[int, str]:
    """Names from the dataset's ``object_detection/config.yaml``, else numbers."""
    path = resolve_path(Path(data_cfg["root"]) / "object_detection" / "config.yaml")
    names = read_yaml(path).get("names", {}) if path.is_file() else {}
    return {i: str(names.get(i, i)) for i in range(num_classes)}


def detection_classes(cfg: Dict[str, Any]) -> int:
    head = cfg["model"]["heads"].get("detection")
    if head is None:
        raise ConfigError("model.heads needs a 'detection' head for coco128 training and evaluation")
    return int(head.get("num_classes", 80))


def build_loader(dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    # Augmenting datasets read their epoch at fork time: workers must be re-created every epoch.
    persistent = num_workers > 0 and getattr(dataset, "augment", None) is None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_detection,
        generator=generator,
        persistent_workers=persistent,
    )


def make_optimizer(params: List[torch.nn.Parameter], train_cfg: Dict[str, Any]) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (1-d tensors), as YOLO and ViT recipes do.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train_cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if train_cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg["lr"], momentum=train_cfg["momentum"], nesterov=True)
    return torch.optim.AdamW(groups, lr=train_cfg["lr"], betas=(train_cfg["momentum"], 0.999))


def lr_lambda(total_steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 1 % of the base rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
