"""The training loop: student + task heads + feature distillation from cached and live teachers."""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from vfmkd.core.config import experiment_record, resolve_path
from vfmkd.core.device import resolve_amp
from vfmkd.core.errors import CheckpointError, ConfigError, NonFiniteLossError
from vfmkd.distillation.cached import CachedTargetsDataset, DistillBatch
from vfmkd.distillation.online_distiller import measure_channel_stats
from vfmkd.engine.builders import (
    LiveTeachers,
    build_augment,
    build_dataset,
    build_distiller,
    build_model,
    build_router,
    head_tasks,
)
from vfmkd.engine.evaluation.evaluator import build_scorers, evaluate, primary_metric, scalar_metrics
from vfmkd.engine.pictures.epoch_vis import EpochVisualizer, semantic_class_names
from vfmkd.engine.training.distributed import init_distributed
from vfmkd.engine.training.epoch_report import log_epoch, metrics_summary
from vfmkd.engine.training.fusion_log import log_fusion_weights
from vfmkd.engine.training.loggers import RunLoggers, check_loggers
from vfmkd.engine.training.resume import (
    capture_rng,
    check_finished,
    check_resume_config,
    restore_rng,
    resume_checkpoint,
)
from vfmkd.engine.training.run_dir import create_run_dir, remove_unused_run_dir, write_json, write_run_config
from vfmkd.engine.training.run_parts import (
    build_loader,
    class_names,
    detection_classes,
    make_optimizer,
    seed_everything,
    worker_count,
)
from vfmkd.engine.training.stages import build_stages, stage_of, staged_lr_lambda
from vfmkd.utils.checkpoint import publish_copy, save_checkpoint
from vfmkd.utils.logging import get_logger, setup_logging
from vfmkd.utils.plots import plot_training_curves
from vfmkd.utils.stop_signals import Stopped, deferred, requested, rerun_command, signal_name

__all__ = ["Trainer", "TrainStep"]


class TrainStep(torch.nn.Module):
    """The modules a training step trains, as one (what DDP wraps): ``forward(batch, targets,
    autocast)`` runs the student on ``batch.images`` (B, 3, S, S) and returns the distiller's
    :class:`LossResult` (a NaN/inf is reported in ``problem``, not raised: ranks decide together)."""

    def __init__(self, model: torch.nn.Module, distiller: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.distiller = model, distiller

    def forward(self, batch: Any, targets: Dict[str, Any], autocast: Any) -> Any:
        with autocast:
            out = self.model(batch.images)
        return self.distiller(out, batch, targets, raise_non_finite=False)


class Trainer:
    """Builds everything from a resolved experiment config and runs ``fit()``.

    The run directory holds ``config.yaml``, ``train.log``, ``checkpoints/{last,best}.pt``,
    ``metrics.json`` (per-epoch stage, losses, cosines, val mAP and held-out fidelity) and
    TensorBoard events.
    """

    def __init__(self, cfg: Dict[str, Any], run_dir: Optional[Path] = None, progress: bool = True,
                 resume: Optional[Path] = None) -> None:
        self.created_run_dir: Optional[Path] = None  # the run directory this Trainer made (not a resumed one)
        try:
            self._setup(cfg, run_dir, progress, resume)
        except BaseException as exc:
            self._discard_unsaved_run()
            if isinstance(exc, Stopped):
                exc.outcome = self._continue_line() if hasattr(self, "run_dir") else (
                    f"the run stopped before it started, nothing was saved; start it again: {rerun_command()}")
            raise

    def _setup(self, cfg: Dict[str, Any], run_dir: Optional[Path], progress: bool, resume: Optional[Path]) -> None:
        self.cfg = cfg  # the resolved config as loaded: saved into the run directory and checkpoints
        resumed: Optional[Dict[str, Any]] = None
        if resume is not None:  # checked before anything is built or written
            checkpoint, resumed = resume_checkpoint(resume)
            if "resume" not in resumed:
                raise CheckpointError(f"{checkpoint} holds no training state to resume (written by an older vfmkd?)")
            check_resume_config(resumed["config"], cfg, checkpoint)
            check_finished(resumed, int(cfg["train"]["epochs"]), checkpoint)  # nothing built or written yet
            run_dir = checkpoint.parent.parent
        exp = experiment_record(cfg)
        self.exp = exp
        self.train_cfg, self.dist_cfg, self.eval_cfg = exp.train, exp.distillation, exp.eval
        self.progress = progress
        data, train = exp.data, exp.train
        seed_everything(train.seed)  # first: the student's initial weights follow train.seed (same on every rank)
        # Checks that need no run directory come first, so a mistake leaves no empty run behind.
        self.ctx = init_distributed(train.device)
        self.device = self.ctx.device
        self.amp = resolve_amp(train.amp, self.device)  # auto: bf16 autocast on a bf16-capable GPU
        self.num_classes = detection_classes(exp.model.heads)
        self.stages = build_stages(train)
        check_loggers(train.loggers)
        self.tasks = head_tasks(exp.model)
        self.augment = build_augment(data)
        self.train_set = build_dataset(data, data.train_split, self.num_classes, self.augment, train.seed,
                                       tasks=self.tasks.values(), heads=exp.model.heads)
        self.val_set = build_dataset(data, data.val_split, self.num_classes, tasks=self.tasks.values(),
                                     heads=exp.model.heads)
        self.live = LiveTeachers(exp.teachers, self.device)
        self.router = build_router(exp, self.train_set, self.live, self.augment, rank=self.ctx.rank)
        self.model = build_model(exp.model, initialise=resumed is None)  # a resumed run has its own weights
        if self.ctx.is_main and run_dir is None:
            run_dir = self.created_run_dir = create_run_dir(resolve_path(exp.work_dir), exp.experiment_name)
        self.run_dir = Path(self.ctx.broadcast(str(run_dir)))
        # Rank 0 alone writes the log file (appended when resuming); other ranks print warnings only.
        self.log = setup_logging(self.run_dir / "train.log" if self.ctx.is_main else None,
                                 logging.INFO if self.ctx.is_main else logging.WARNING)
        if self.ctx.is_main:
            write_run_config(self.run_dir, cfg)
        self.log.info("%s %s", "resuming in run directory" if resumed else "run directory:", self.run_dir)
        if self.model.init_report is not None:
            self.log.info("%s", self.model.init_report.summary())
        self.router.load_live_models()
        self.model = self.model.to(self.device)
        if train.sync_bn and self.ctx.enabled:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.distiller = build_distiller(exp, self.model, self.router, self.live).to(self.device)
        # Student and adapters train as one module; DDP averages their gradients across ranks. Stages
        # and distill_interval leave some parameters unused in a step, hence find_unused_parameters.
        self.step_module: torch.nn.Module = TrainStep(self.model, self.distiller)
        if self.ctx.enabled:
            self.step_module = DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        for stage in self.stages:  # a typo in a stage fails now, not epochs later
            self.distiller.set_stage(stage.losses, stage.weights)
        distilled = list(self.distiller.teachers_used(active_only=False))
        unused = set(self.router.sources) - set(distilled)
        if unused:
            self.log.warning("enabled teacher(s) %s have no loss in distillation.losses and are ignored",
                             sorted(unused))
        self.names = class_names(data.root, self.num_classes)
        workers = worker_count(data.num_workers)
        caches = {n: s.cache for n, s in self.router.sources.items() if s.cache is not None}
        missing = {n: s.missing for n, s in self.router.sources.items()}
        train_data = CachedTargetsDataset(self.train_set, caches, missing)
        # The epoch's order is a function of (seed, epoch), split across ranks: N ranks with batch B
        # see, step by step, the same images as one process with batch N x B.
        self.sampler = DistributedSampler(train_data, self.ctx.world_size, self.ctx.rank, shuffle=True, seed=train.seed)
        self.train_loader = build_loader(train_data, data.batch_size, workers, True, train.seed, sampler=self.sampler)
        self.val_router = None
        val_set: Any = self.val_set
        if self.eval_cfg.fidelity and distilled and self.ctx.is_main:  # rank 0 alone validates
            self.val_router = build_router(exp, self.val_set, self.live, validation=True)
            self.val_router.load_live_models(distilled)
            val_caches = {n: s.cache for n, s in self.val_router.sources.items() if s.cache is not None}
            val_set = CachedTargetsDataset(self.val_set, val_caches,
                                           {n: s.missing for n, s in self.val_router.sources.items()})
        self.val_loader = build_loader(val_set, self.eval_cfg.batch_size, workers, False, train.seed)
        if self.dist_cfg.standardize:
            self._set_standardisation()
        self.params = [p for p in list(self.model.parameters()) + list(self.distiller.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(self.params, train.optimizer, train.lr, train.momentum, train.weight_decay)
        steps_per_epoch = -(-len(self.train_loader) // train.accumulate)  # ceil: a partial group still steps
        warmup = train.warmup_epochs * steps_per_epoch if train.warmup_epochs else train.warmup_iters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, staged_lr_lambda(self.stages, steps_per_epoch, warmup, train.lr))
        self.writer = RunLoggers(self.run_dir, train.loggers, config=cfg,
                                 name=self.run_dir.name) if self.ctx.is_main else None
        self.history: List[Dict[str, Any]] = []
        self.best_fitness = -1.0
        self.step = 0  # micro-batches seen
        self.optimizer_steps = 0
        self.nonfinite_in_a_row = 0
        self._seconds_before, self._fit_start = 0.0, None  # training time of the run's earlier sessions (resumes)
        # Where fit() starts: epoch, batches of it already trained and their running log sums.
        self.start_epoch, self.start_batch, self._partial = 1, 0, ({}, {})
        self._epoch_generator = self.train_loader.generator.get_state()
        if resumed is not None:
            self._restore(resumed)
        n_params = sum(p.numel() for p in self.model.parameters())
        modes = {
            n: ("offline" if s.cache is not None else "online") + (", live model loaded" if s.live and s.cache else "")
            for n, s in self.router.sources.items()
        }
        self.log.info(
            "student %s (%.2fM params) on %s (train.device=%s), bf16 autocast %s (train.amp=%s); %d train / %d val "
            "images; teachers: %s; offline_ratio=%s; stages: %s",
            exp.model.backbone["type"], n_params / 1e6, self.device, exp.train.device, "on" if self.amp else "off",
            str(exp.train.amp).lower(), len(self.train_set), len(self.val_set),
            ", ".join(f"{n} ({m})" for n, m in modes.items()) or "none", self.dist_cfg.offline_ratio,
            "; ".join(f"{s.name} epochs {s.first_epoch}-{s.last_epoch}" for s in self.stages),
        )

    def _set_standardisation(self) -> None:
        """Per-channel stats from each cache; online-only teachers measure theirs on a few images."""
        for name, src in self.router.sources.items():
            stats = dict(src.cache.stats) if src.cache is not None else {}
            used = self.distiller.features_used(name)
            missing = [f for f in used if f not in stats]
            if missing and src.live is not None:
                plain = build_dataset(self.exp.data, self.train_set.split, self.num_classes)
                stats.update(measure_channel_stats(src.live, build_loader(plain, 8, 0, False, self.train_cfg.seed)))
                self.log.info("teacher %s: per-channel stats of %s measured on up to 32 training images", name, missing)
            for feature in used:
                if feature in stats:
                    self.distiller.set_teacher_stats(name, feature, *stats[feature])
                else:
                    self.log.warning("teacher %s: no per-channel stats for %s (older cache): not standardised", name,
                                     feature)

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, item: DistillBatch, interval: int) -> Dict[str, float]:
        """Forward + backward of one micro-batch (the optimizer step is the caller's)."""
        batch = item.batch.to(self.device)
        teachers = list(self.distiller.teachers_used())
        targets = self.router.targets(self.step, batch, item.cached, teachers) if self.step % interval == 0 else {}
        result = self.step_module(batch, targets, self._autocast())
        if self.ctx.any(bool(result.problem)):  # every rank refuses the step together
            # DDP expects this step's gradient reduction: finish it with a zero loss, then drop it.
            (torch.nan_to_num(result.total) * 0.0).backward()
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(result.problem or "another rank's loss is not finite; the step was refused on "
                                                       "every rank")
        (result.total / self.train_cfg.accumulate).backward()
        self.step += 1
        return result.logs

    def train_one_epoch(self, epoch: int, skip: int = 0) -> Dict[str, float]:
        """One epoch; ``skip`` batches of it were trained before a resume (the same order is
        replayed from the saved shuffling state and those batches are passed over)."""
        self.model.train()
        self.distiller.train()
        self.train_loader.dataset.set_epoch(epoch)
        train_cfg, interval = self.train_cfg, self.dist_cfg.distill_interval
        accumulate, n_batches = train_cfg.accumulate, len(self.train_loader)
        sums, counts = (dict(d) for d in self._partial) if skip else ({}, {})
        self.sampler.set_epoch(epoch)  # each rank's share of the epoch's shuffle, from (seed, epoch)
        if not skip:
            self._epoch_generator = self.train_loader.generator.get_state()
        self.train_loader.generator.set_state(self._epoch_generator)
        batches = itertools.islice(iter(self.train_loader), skip, None)
        bar = tqdm(batches, desc=f"epoch {epoch}/{train_cfg.epochs}", disable=not self.progress,
                   initial=skip, total=n_batches)
        self.optimizer.zero_grad(set_to_none=True)
        for i, item in enumerate(bar, start=skip):
            try:
                logs = self.train_step(item, interval)
            except NonFiniteLossError as exc:
                # Refused before the optimizer ran; K in a row (train.max_nonfinite_steps) stop the run.
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_in_a_row += 1
                if self.nonfinite_in_a_row >= train_cfg.max_nonfinite_steps:
                    raise
                self.log.warning("step %d refused (%d in a row): %s", self.step, self.nonfinite_in_a_row, exc)
                self.step += 1
                continue
            self.nonfinite_in_a_row = 0
            if (i + 1) % accumulate == 0 or i + 1 == n_batches:
                # Clip what the optimizer trains: the student and the distillation adapters.
                torch.nn.utils.clip_grad_norm_(self.params, train_cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.optimizer_steps += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k == "loss" or k.startswith("cos_")})
            if self.writer is not None and self.step % train_cfg.log_interval == 0:
                for k, v in logs.items():
                    self.writer.add_scalar(f"train/{k}", v, self.step)
                self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
            every = train_cfg.save_interval_steps
            if every and (i + 1) % accumulate == 0 and self.optimizer_steps % every == 0 and i + 1 < n_batches:
                self._partial = (sums, counts)
                self.save("last.pt", epoch - 1, {"epoch": epoch, "batch": i + 1}, resume_at=(epoch, i + 1))
            if (i + 1) % accumulate == 0 and i + 1 < n_batches:  # a safe point: the step's update is complete
                self._partial = (sums, counts)
                self._stop_if_asked(epoch, i + 1)
        return self.ctx.sum_logs(sums, counts)

    def evaluate(self, epoch: Optional[int] = None) -> Dict[str, Any]:
        """Validation metrics of every head (+ held-out fidelity); with ``epoch`` due for
        ``train.vis_interval``, the first batch is also drawn into visualizations/epoch_XXX.png."""
        e, vis = self.eval_cfg, None
        every = self.train_cfg.vis_interval
        if epoch is not None and every and epoch % every == 0:
            vis = EpochVisualizer(self.run_dir, "epoch", epoch, self.tasks, self.distiller, self.names,
                                  semantic_class_names(self.val_set), e.vis_images, self.writer)
        scorers = build_scorers(self.tasks, self.names, semantic_class_names(self.val_set), e.conf, e.iou, e.max_det,
                                data_root=self.val_set.root, split=self.val_set.split)
        return evaluate(self.model, self.val_loader, scorers, self.device, progress=self.progress,
                        distiller=self.distiller if self.val_router else None, router=self.val_router,
                        on_batch=vis.on_batch if vis is not None else None)

    def save(self, name: str, epoch: int, metrics: Dict[str, Any],
             resume_at: Optional[Tuple[int, int]] = None) -> Optional[Path]:
        """Write ``checkpoints/<name>`` atomically with everything :meth:`_restore` needs; ``epoch``
        is the last completed epoch, ``resume_at`` (epoch, batch) where a resume continues (default:
        the start of the next epoch)."""
        if not self.ctx.is_main:
            return None
        resume_epoch, resume_batch = resume_at or (epoch + 1, 0)
        generator = self._epoch_generator if resume_batch else self.train_loader.generator.get_state()
        return save_checkpoint(self.run_dir / "checkpoints" / name, keep_previous=name == "last.pt", state={
            "model": self.model.state_dict(),
            "distiller": self.distiller.state_dict(),
            "teacher_stats": self.distiller.teacher_stats(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "config": self.cfg,
            "metrics": metrics,
            "resume": {
                "epoch": resume_epoch, "batch": resume_batch, "step": self.step,
                "optimizer_steps": self.optimizer_steps,
                "partial_sums": dict(self._partial[0]) if resume_batch else {},
                "partial_counts": dict(self._partial[1]) if resume_batch else {},
                "history": self.history, "best_fitness": self.best_fitness,
                "router_counts": self.router.summary(), "loader_generator": generator, "rng": capture_rng(),
                "sampling": self.distiller.sampling_states(),
                "world_size": self.ctx.world_size, "train_seconds": self.train_seconds(),
            },
        })

    def _restore(self, state: Dict[str, Any]) -> None:
        """Continue the run a checkpoint of :meth:`save` describes."""
        self.model.load_state_dict(state["model"])
        self.distiller.load_state_dict(state["distiller"])
        self.distiller.load_teacher_stats(state.get("teacher_stats", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        r = state["resume"]
        if int(r.get("world_size", 1)) != self.ctx.world_size:
            raise ConfigError(f"the checkpoint was written by a run of {r.get('world_size', 1)} process(es), this one "
                              f"has {self.ctx.world_size}: the data order would not continue; resume with the same "
                              "world size")
        self.start_epoch, self.start_batch = int(r["epoch"]), int(r["batch"])
        self.step, self.optimizer_steps = int(r["step"]), int(r["optimizer_steps"])
        self._partial = (dict(r["partial_sums"]), dict(r["partial_counts"]))
        self.history, self.best_fitness = list(r["history"]), float(r["best_fitness"])
        for name, counts in r["router_counts"].items():
            self.router.counts[name].update(counts)
        self._epoch_generator = r["loader_generator"]
        self.train_loader.generator.set_state(r["loader_generator"])
        restore_rng(r["rng"])
        self.distiller.load_sampling_states(r.get("sampling", {}))
        self._seconds_before = float(r.get("train_seconds", 0.0))
        self.log.info("resumed at epoch %d, batch %d (step %d)", self.start_epoch, self.start_batch, self.step)

    def train_seconds(self) -> float:
        """Seconds this run has trained, over every session of it (a resume adds to the saved total)."""
        return self._seconds_before + (time.time() - self._fit_start if self._fit_start is not None else 0.0)

    def fit(self) -> Dict[str, Any]:
        """Train the remaining epochs; metrics.json's content. A SIGINT/SIGTERM (tools install the handlers)
        stops at the next optimizer step after saving a resumable last.pt (:meth:`_stop_if_asked`)."""
        try:
            with deferred():
                return self._fit()
        except BaseException as exc:
            self._discard_unsaved_run()
            if isinstance(exc, Stopped) and not exc.outcome:  # a second signal, or one outside the safe points
                exc.outcome = self._continue_line()
            raise

    def _continue_line(self) -> str:
        """What a stopped run tells its user: the command that continues it, or that nothing was saved."""
        last = self.run_dir / "checkpoints" / "last.pt"
        if not self.ctx.is_main:
            return "rank 0 saves the run"
        if self.created_run_dir is None and not last.exists():  # removed by _discard_unsaved_run
            return f"the run stopped before its first checkpoint, nothing was saved; start it again: {rerun_command()}"
        launcher = (f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', self.ctx.world_size)}"
                    if self.ctx.enabled else "python")
        return (f"{last} holds the run; continue it with: {launcher} {sys.argv[0] or 'tools/train.py'} "
                f"--resume {self.run_dir}")

    def _stop_if_asked(self, epoch: int, batch: int = 0) -> None:
        """A safe point (an optimizer step just finished, or an epoch was saved): when a signal asked any rank
        to stop, every rank stops here together; mid-epoch (``batch`` > 0) last.pt is saved first."""
        signum = self.ctx.max_int(requested())
        if not signum:
            return
        if batch:
            self.save("last.pt", epoch - 1, {"epoch": epoch, "batch": batch, "interrupted": signal_name(signum)},
                      resume_at=(epoch, batch))
        if self.history:
            self._write_metrics(self.train_seconds())  # the time trained so far
        self.ctx.barrier()  # rank 0 has written: the other ranks may go
        raise Stopped(signum, self._continue_line())

    def _fit(self) -> Dict[str, Any]:
        train_cfg = self.train_cfg
        self._fit_start = time.time()
        current = None
        for epoch in range(self.start_epoch, (train_cfg.epochs or 0) + 1):
            stage = stage_of(self.stages, epoch)
            if stage is not current:
                self.distiller.set_stage(stage.losses, stage.weights)
                if epoch == stage.first_epoch and not (epoch == self.start_epoch and self.start_batch):
                    self.best_fitness = -1.0  # best.pt is chosen within the last stage
                self.log.info("stage %s: epochs %d-%d, losses %s, lr %g", stage.name, stage.first_epoch,
                              stage.last_epoch, ", ".join(stage.losses) if stage.losses is not None else "all",
                              stage.lr)
                current = stage
            try:
                epoch_logs = self.train_one_epoch(epoch, self.start_batch if epoch == self.start_epoch else 0)
            except NonFiniteLossError:
                # Refused before the optimizer step; a checkpoint holding NaN/inf is never written.
                try:
                    path = self.save("last.pt", epoch - 1, {"epoch": epoch, "interrupted": "non-finite loss"})
                    self.log.error("non-finite loss in epoch %d; weights saved to %s", epoch, path)
                except CheckpointError as exc:
                    self.log.error("non-finite loss in epoch %d; the weights are not finite either (%s): the last good "
                                   "checkpoint is kept", epoch, exc)
                raise
            record: Dict[str, Any] = {"epoch": epoch, "stage": stage.name, "train": epoch_logs,
                                      "teacher_batches": self.router.summary(),
                                      "images_without_cells": self._cellless_counts(epoch)}
            log_fusion_weights(self.model, record, self.writer)  # a learnable-fusion neck's weights
            if self.ctx.is_main and (epoch % train_cfg.eval_interval == 0 or epoch == stage.last_epoch):
                val = self.evaluate(epoch)
                record["val"] = val
                assert self.writer is not None  # rank 0
                self.writer.add_scalars(scalar_metrics(val), epoch, prefix="val/")
                fitness, tag = primary_metric(val, self.tasks)[3:]
                if stage is self.stages[-1] and fitness >= self.best_fitness:
                    self.best_fitness = fitness
                    self._save_best(epoch, record, tag)
                    record["best"] = True
            self.history.append(record)  # before last.pt: a run killed after this save resumes with the record
            last = self.save("last.pt", epoch, record)
            if last is not None and train_cfg.save_period and epoch % train_cfg.save_period == 0:
                publish_copy(last, last.with_name(f"checkpoint_epoch{epoch}.pt"))
            self._log_epoch(record)
            self._write_metrics(self.train_seconds())
            self.ctx.barrier()  # the other ranks wait while rank 0 validates and writes
            if epoch < (train_cfg.epochs or 0):  # after the last epoch the run is finished anyway
                self._stop_if_asked(epoch + 1)
        if self.writer is not None:
            self.writer.close()
            plot_training_curves(self.history, self.run_dir / "training_curves.png")
        return self._write_metrics(self.train_seconds())

    def _discard_unsaved_run(self) -> None:
        """Remove the run directory this Trainer created when the run stops (a config error found after it
        was made, a signal, a crash) before any checkpoint was written: nothing in it is worth keeping."""
        run = self.created_run_dir
        if run is None or any((run / "checkpoints").glob("*.pt")):
            return
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
        setup_logging(None)  # closes train.log
        if remove_unused_run_dir(run, ("checkpoints/*.pt",)):
            self.created_run_dir = None
            get_logger().info("removed the run directory %s: the run stopped before writing a checkpoint", run)

    def _save_best(self, epoch: int, record: Dict[str, Any], tag: str) -> None:
        """best.pt and its named twin best_epoch{E}_{metric}{value}.pt (the previous twin removed)."""
        best = self.save("best.pt", epoch, record)
        if best is None:
            return
        named = best.with_name(f"best_epoch{epoch}_{tag}.pt")
        for old in best.parent.glob("best_epoch*.pt"):
            if old != named:
                old.unlink(missing_ok=True)
        publish_copy(best, named)

    def _cellless_counts(self, epoch: int) -> Dict[str, int]:
        """Per feature loss: training images of this epoch (all ranks) whose view had no valid cell on
        the student's grid, so that loss taught them nothing; a warning in train.log names them."""
        cellless = self.distiller.take_cellless()
        means = self.ctx.sum_logs({k: float(len(v)) for k, v in cellless.items()}, {k: 1 for k in cellless})
        counts = {k: int(round(v * self.ctx.world_size)) for k, v in means.items()}
        for name, n in counts.items():
            if n:
                self.log.warning("epoch %d: %d training image(s) had no valid cell on the student grid for "
                                 "distillation.losses.%s, so no distillation signal (e.g. %s): an image whose content "
                                 "is thinner than one student cell after the letterbox; a larger data.img_size or a "
                                 "finer student level gives it cells", epoch, n, name, ", ".join(cellless[name][:5]))
        return counts

    def _log_epoch(self, record: Dict[str, Any]) -> None:
        log_epoch(self.log, record, self.train_cfg.epochs, self.tasks, self.router.summary())

    def _write_metrics(self, seconds: float) -> Dict[str, Any]:
        metrics = metrics_summary(self.exp.experiment_name, [s.describe() for s in self.stages], self.history,
                                  self.tasks, seconds, self.ctx.world_size)
        if self.ctx.is_main:
            write_json(self.run_dir / "metrics.json", metrics)
        return metrics
