"""The steps of a training epoch: :class:`EpochLoop`, what :class:`~vfmkd.engine.training.trainer.Trainer`
runs for each epoch of ``fit()`` (its micro-batch step, the optimizer steps with accumulation and clipping, refused
non-finite steps, mid-epoch checkpoints and stop requests, the epoch's log sums)."""
from __future__ import annotations

import contextlib
import itertools
from typing import Dict, Iterator, Union

import torch
from tqdm import tqdm

from vfmkd.core.errors import NonFiniteLossError
from vfmkd.distillation.cached import DistillBatch
from vfmkd.distillation.prefetch import PreparedBatch, prepared_epoch
from vfmkd.engine.training.epoch_report import EpochSums


class EpochLoop:
    """The epoch loop of the :class:`~vfmkd.engine.training.trainer.Trainer` (its base class): ``train_step`` and
    ``train_one_epoch`` on the run the Trainer built (model, distiller, step module, loaders, optimizer and
    schedule, prefetcher, teacher dropping, resolution sampler, counters ``step`` / ``optimizer_steps`` /
    ``nonfinite_in_a_row``) and its ``save`` / ``_stop_if_asked`` at the safe points of an epoch."""

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, item: Union[DistillBatch, PreparedBatch], interval: int) -> Dict[str, float]:
        """Forward + backward of one micro-batch (the optimizer step is the caller's): a loader item, or
        a :class:`PreparedBatch` whose targets the epoch's prefetcher computed."""
        draw = self.teacher_drop.draw(self.step, self.distiller.teachers_used())  # teacher dropping
        if isinstance(item, PreparedBatch):
            assert item.step == self.step, f"prepared for step {item.step}, trained at step {self.step}"
            batch, targets = item.batch, item.targets
        else:
            batch = self.resolutions.rescale(self.step, item.batch).to(self.device)
            targets = self.router.targets(self.step, batch, item.cached, draw.kept) if self.step % interval == 0 else {}
        result = self.step_module(batch, targets, self._autocast(), draw.scale if targets else None)
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
        self.distiller.on_epoch_start(epoch, self.train_cfg.epochs or epoch)  # per-epoch loss schedules (resumes too)
        self.train_loader.dataset.set_epoch(epoch)
        totals = EpochSums(*self._partial) if skip else EpochSums()
        self.sampler.set_epoch(epoch)  # each rank's share of the epoch's shuffle, from (seed, epoch)
        if not skip:
            self._epoch_generator = self.train_loader.generator.get_state()
        self.train_loader.generator.set_state(self._epoch_generator)
        batches = self.resolutions.items(itertools.islice(iter(self.train_loader), skip, None), self.step)
        self._epoch_first_step = self.step - skip  # every batch (trained or refused) advances the step by one
        # fixed within an epoch (stages change at epoch starts); with teacher dropping, per step
        teachers = self.teacher_drop.plan(list(self.distiller.teachers_used()))
        with prepared_epoch(self.prefetcher, batches, self.step, self.dist_cfg.distill_interval, teachers) as ready:
            return self._train_batches(epoch, skip, ready, totals)

    def _train_batches(self, epoch: int, skip: int, ready: Iterator[PreparedBatch],
                       totals: EpochSums) -> Dict[str, float]:
        """The steps of one epoch over its prepared batches (from batch ``skip`` on); the epoch's logs."""
        train_cfg, interval = self.train_cfg, self.dist_cfg.distill_interval
        accumulate, n_batches = train_cfg.accumulate, len(self.train_loader)
        bar = tqdm(ready, desc=f"epoch {epoch}/{train_cfg.epochs}", disable=not self.progress,
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
            totals.add(logs)
            if not all(self.train_set.labelled):  # a mixed set: images seen this epoch, summed over every rank
                totals.add_images(int(item.batch.labelled.sum()), len(item.batch), self.ctx.is_main)
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k == "loss" or k.startswith("cos_")})
            if self.writer is not None and self.step % train_cfg.log_interval == 0:
                self.writer.add_scalars({**logs, "lr": self.scheduler.get_last_lr()[0]}, self.step, prefix="train/")
            every = train_cfg.save_interval_steps
            if every and (i + 1) % accumulate == 0 and self.optimizer_steps % every == 0 and i + 1 < n_batches:
                self._partial = totals.state()
                self.save("last.pt", epoch - 1, {"epoch": epoch, "batch": i + 1}, resume_at=(epoch, i + 1))
            if (i + 1) % accumulate == 0 and i + 1 < n_batches:  # a safe point: the step's update is complete
                self._partial = totals.state()
                self._stop_if_asked(epoch, i + 1)
        return self.ctx.sum_logs(*totals.state())
