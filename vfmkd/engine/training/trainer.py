"""The training loop: student + task heads + feature distillation from cached and live teachers."""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from vfmkd.core.config import experiment_record, resolve_path
from vfmkd.core.config_schema import ExperimentConfig, TrainConfig
from vfmkd.core.device import resolve_amp
from vfmkd.core.errors import CheckpointError, NonFiniteLossError
from vfmkd.distillation.prefetch import TargetPrefetcher
from vfmkd.distillation.teacher_drop import TeacherDropper
from vfmkd.engine.builders import (
    LiveTeachers,
    build_augment,
    build_dataset,
    build_distiller,
    build_model,
    build_router,
    class_names,
    detection_classes,
    head_tasks,
)
from vfmkd.engine.evaluation.evaluator import build_scorers, evaluate, primary_metric, scalar_metrics
from vfmkd.engine.pictures.epoch_vis import EpochVisualizer, semantic_class_names
from vfmkd.engine.training.distributed import init_distributed
from vfmkd.engine.training.epoch_loop import EpochLoop
from vfmkd.engine.training.epoch_report import cellless_counts, log_epoch, log_run_start, metrics_summary
from vfmkd.engine.training.fusion_log import log_fusion_weights
from vfmkd.engine.training.loaders import build_run_loaders, plain_loader
from vfmkd.engine.training.loggers import RunLoggers, check_loggers
from vfmkd.engine.training.multi_resolution import ResolutionSampler
from vfmkd.engine.training.optimizer import make_optimizer, staged_scheduler
from vfmkd.engine.training.resume import restore_training_state, resumable_state, seed_everything, training_state
from vfmkd.engine.training.run_dir import (
    continue_line,
    create_run_dir,
    discard_unsaved_run,
    publish_best_twin,
    write_json,
    write_run_config,
)
from vfmkd.engine.training.stages import build_stages, enter_stage, stage_of
from vfmkd.engine.training.teacher_stats import set_teacher_stats, standardize_mode
from vfmkd.engine.training.train_step import TrainStep, train_step_module
from vfmkd.utils.checkpoint import publish_copy, save_checkpoint
from vfmkd.utils.logging import setup_logging
from vfmkd.utils.plots import plot_training_curves
from vfmkd.utils.stop_signals import Stopped, deferred, requested, rerun_command, signal_name

__all__ = ["Trainer", "TrainStep"]  # TrainStep: vfmkd/engine/training/train_step.py


class Trainer(EpochLoop):
    """Builds everything from a resolved experiment config and runs ``fit()`` (the steps of an epoch:
    :class:`~vfmkd.engine.training.epoch_loop.EpochLoop`).

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
        resumed = None
        if resume is not None:  # checked before anything is built or written
            checkpoint, resumed = resumable_state(resume, cfg)
            run_dir = checkpoint.parent.parent
        exp = self.exp = experiment_record(cfg)
        self.train_cfg, self.dist_cfg, self.eval_cfg = exp.train, exp.distillation, exp.eval
        self.progress = progress
        seed_everything(exp.train.seed)  # first: the student's initial weights follow train.seed (same on every rank)
        # Checks that need no run directory come first, so a mistake leaves no empty run behind.
        self.ctx = init_distributed(exp.train.device)
        self.device = self.ctx.device
        self.amp = resolve_amp(exp.train.amp, self.device)  # auto: bf16 autocast on a bf16-capable GPU
        self.num_classes = detection_classes(exp.model.heads)
        self.stages = build_stages(exp.train)
        self.standardize = standardize_mode(exp.distillation.standardize)
        # the agglomerative recipe (docs/agglomerative.md): both draws are functions of (train.seed, step)
        self.teacher_drop = TeacherDropper(exp.distillation.teacher_drop_prob, exp.train.seed)
        self.resolutions = ResolutionSampler(exp.data.img_sizes, exp.train.seed)
        check_loggers(exp.train.loggers)
        self._setup_data(exp)
        self._setup_teachers_and_model(exp, initialise=resumed is None)  # a resumed run has its own weights
        self._open_run_dir(cfg, run_dir, resuming=resumed is not None)
        distilled = self._setup_distiller(exp)
        self._setup_loaders(exp, distilled)
        self._setup_prefetch(exp.train)
        if self.standardize:  # a live teacher measures its stats on plain images (no augmentation, no cache)
            images = functools.partial(plain_loader, exp, self.train_set.split, self.num_classes)
            set_teacher_stats(self.router, self.distiller, images, self.log, self.standardize)
        self._setup_optimizer(exp.train)
        self._setup_progress(cfg, resumed)
        log_run_start(self.log, exp, self.model, self.device, self.amp, (len(self.train_set), len(self.val_set)),
                      self.router.sources, self.stages)

    def _setup_data(self, exp: ExperimentConfig) -> None:
        """The heads' tasks, the augmentation and the train / val datasets."""
        data, seed = exp.data, exp.train.seed
        self.tasks = head_tasks(exp.model)
        self.augment = build_augment(data)
        self.train_set = build_dataset(data, data.train_split, self.num_classes, self.augment, seed,
                                       tasks=self.tasks.values(), heads=exp.model.heads,
                                       losses=exp.distillation.losses)
        self.val_set = build_dataset(data, data.val_split, self.num_classes, tasks=self.tasks.values(),
                                     heads=exp.model.heads)

    def _setup_teachers_and_model(self, exp: ExperimentConfig, initialise: bool) -> None:
        """The live teachers (built, not loaded yet), the router that picks cached or live targets per
        batch, and the student (``initialise``: load ``model.init``)."""
        self.live = LiveTeachers(exp.teachers, self.device)
        self.router = build_router(exp, self.train_set, self.live, self.augment, rank=self.ctx.rank)
        self.model = build_model(exp.model, initialise=initialise, training=True)

    def _open_run_dir(self, cfg: Dict[str, Any], run_dir: Optional[Path], resuming: bool) -> None:
        """The run directory (made by rank 0 unless given), train.log and config.yaml in it."""
        if self.ctx.is_main and run_dir is None:
            run_dir = self.created_run_dir = create_run_dir(resolve_path(self.exp.work_dir), self.exp.experiment_name)
        self.run_dir = Path(self.ctx.broadcast(str(run_dir)))
        # Rank 0 alone writes the log file (appended when resuming); other ranks print warnings only.
        self.log = setup_logging(self.run_dir / "train.log" if self.ctx.is_main else None,
                                 logging.INFO if self.ctx.is_main else logging.WARNING)
        if self.ctx.is_main:
            write_run_config(self.run_dir, cfg)
        self.log.info("%s %s", "resuming in run directory" if resuming else "run directory:", self.run_dir)
        if self.model.init_report is not None:
            self.log.info("%s", self.model.init_report.summary())

    def _setup_distiller(self, exp: ExperimentConfig) -> List[str]:
        """Live teachers loaded, the student on its device, the distiller and the module a step trains
        (DDP-wrapped under torchrun); returns the teachers some loss distils from."""
        self.router.load_live_models()
        self.model = self.model.to(self.device)
        if exp.train.sync_bn and self.ctx.enabled:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.distiller = build_distiller(exp, self.model, self.router, self.live).to(self.device)
        self.step_module = train_step_module(self.model, self.distiller, self.ctx)
        for stage in self.stages:  # a typo in a stage fails now, not epochs later
            self.distiller.set_stage(stage.losses, stage.weights)
        distilled = list(self.distiller.teachers_used(active_only=False))
        unused = set(self.router.sources) - set(distilled)
        if unused:
            self.log.warning("enabled teacher(s) %s have no loss in distillation.losses and are ignored",
                             sorted(unused))
        return distilled

    def _setup_loaders(self, exp: ExperimentConfig, distilled: List[str]) -> None:
        self.names = class_names(exp.data.root, self.num_classes, self.train_set.names)
        loaders = build_run_loaders(exp, self.train_set, self.val_set, self.router, self.live, self.ctx, distilled)
        self.train_loader, self.sampler, self.val_loader = loaders.train, loaders.sampler, loaders.val
        self.val_router = loaders.val_router

    def _setup_optimizer(self, train: TrainConfig) -> None:
        """The optimizer over the student and the distillation adapters, and the staged LR schedule."""
        self.params = [p for p in list(self.model.parameters()) + list(self.distiller.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(self.params, train.optimizer, train.lr, train.momentum, train.weight_decay)
        self.scheduler = staged_scheduler(self.optimizer, self.stages, train, len(self.train_loader))

    def _setup_prefetch(self, train: TrainConfig) -> None:
        """Live teacher passes of the coming batches overlap the student's steps (train.teacher_prefetch)."""
        self.prefetcher = TargetPrefetcher(self.router, self.device, train.teacher_prefetch,
                                           train.teacher_prefetch_depth, train.teacher_threads)

    def _setup_progress(self, cfg: Dict[str, Any], resumed: Optional[Dict[str, Any]]) -> None:
        """Loggers, counters and where fit() starts: epoch 1, or the resumed checkpoint's place."""
        self.writer = RunLoggers(self.run_dir, self.train_cfg.loggers, config=cfg,
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
            restore_training_state(self, resumed)

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
        return save_checkpoint(self.run_dir / "checkpoints" / name, keep_previous=name == "last.pt",
                               state=training_state(self, epoch, metrics, resume_at))

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
        return continue_line(self.run_dir, self.ctx, removed=self.created_run_dir is None)

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
                current = enter_stage(stage, self.distiller, self.log)
                if epoch == stage.first_epoch and not (epoch == self.start_epoch and self.start_batch):
                    self.best_fitness = -1.0  # best.pt is chosen within the last stage
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
            record: Dict[str, Any] = {
                "epoch": epoch, "stage": stage.name, "train": epoch_logs, "teacher_batches": self.router.summary(),
                "images_without_cells": cellless_counts(self.distiller, self.ctx, self.log, epoch)}
            log_fusion_weights(self.model, record, self.writer)  # a learnable-fusion neck's weights
            if self.teacher_drop.prob > 0:  # recomputed from the (seed, step) draws: exact across resumes
                steps = range(self._epoch_first_step, self.step, 1)
                record["teacher_drops"] = self.teacher_drop.counts(
                    [s for s in steps if s % self.dist_cfg.distill_interval == 0], self.distiller.teachers_used())
                self.log.info("epoch %d teacher drops: %s", epoch, record["teacher_drops"])
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
            log_epoch(self.log, record, train_cfg.epochs, self.tasks, self.router.summary())
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
        if discard_unsaved_run(self.created_run_dir, getattr(self, "writer", None)):
            self.created_run_dir = None

    def _save_best(self, epoch: int, record: Dict[str, Any], tag: str) -> None:
        """best.pt and its named twin best_epoch{E}_{metric}{value}.pt."""
        best = self.save("best.pt", epoch, record)
        if best is not None:
            publish_best_twin(best, epoch, tag)

    def _write_metrics(self, seconds: float) -> Dict[str, Any]:
        metrics = metrics_summary(self.exp.experiment_name, [s.describe() for s in self.stages], self.history,
                                  self.tasks, seconds, self.ctx.world_size)
        if self.ctx.is_main:
            write_json(self.run_dir / "metrics.json", metrics)
        return metrics
