"""Data loaders: :func:`build_loader` (one split, plain or with cached teacher targets; the tester's too),
and a training run's pair (:func:`build_run_loaders`): the train loader (cached teacher targets
attached, the epoch's shuffle sharded across ranks) and the val loader (held-out fidelity targets on
rank 0)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler

from vfmkd.core.config_schema import ExperimentConfig
from vfmkd.datasets import collate_samples
from vfmkd.distillation.cached import CachedTargetsDataset, collate_distill
from vfmkd.engine.builders import build_dataset, build_router
from vfmkd.utils.logging import get_logger
from vfmkd.utils.stop_signals import ignore_in_worker


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


@dataclass
class RunLoaders:
    """``train`` yields :class:`DistillBatch` in the order ``sampler`` draws from (seed, epoch);
    ``val`` yields them too when ``val_router`` serves held-out teacher targets, else plain batches."""

    train: DataLoader
    sampler: DistributedSampler
    val: DataLoader
    val_router: Optional[Any]


def _with_cached_targets(dataset: Any, router: Any) -> CachedTargetsDataset:
    caches = {n: s.cache for n, s in router.sources.items() if s.cache is not None}
    return CachedTargetsDataset(dataset, caches, {n: s.missing for n, s in router.sources.items()})


def build_run_loaders(exp: ExperimentConfig, train_set: Any, val_set: Any, router: Any, live: Any, ctx: Any,
                      distilled: Sequence[str]) -> RunLoaders:
    """The loaders of a run; the val router (and its live teachers) only when ``eval.fidelity``, some loss
    distils (``distilled``: its teachers) and this is rank 0 (rank 0 alone validates)."""
    data, seed = exp.data, exp.train.seed
    workers = worker_count(data.num_workers)
    train_data = _with_cached_targets(train_set, router)
    # The epoch's order is a function of (seed, epoch), split across ranks: N ranks with batch B
    # see, step by step, the same images as one process with batch N x B.
    sampler = DistributedSampler(train_data, ctx.world_size, ctx.rank, shuffle=True, seed=seed)
    train = build_loader(train_data, data.batch_size, workers, True, seed, sampler=sampler)
    val_router, val_data = None, val_set
    if exp.eval.fidelity and distilled and ctx.is_main:
        val_router = build_router(exp, val_set, live, validation=True)
        val_router.load_live_models(list(distilled))
        val_data = _with_cached_targets(val_set, val_router)
    return RunLoaders(train, sampler, build_loader(val_data, exp.eval.batch_size, workers, False, seed), val_router)



def plain_loader(exp: ExperimentConfig, split: str, num_classes: int) -> DataLoader:
    """A split's images without augmentation or cached targets, 8 a batch: what a live teacher measures its
    standardisation statistics on."""
    return build_loader(build_dataset(exp.data, split, num_classes), 8, 0, False, exp.train.seed)
