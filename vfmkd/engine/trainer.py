"""The training loop: student + task heads + feature distillation from cached and live teachers."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from vfmkd.core.config import experiment_record, resolve_path
from vfmkd.distillation.cached import CachedTargetsDataset, DistillBatch
from vfmkd.distillation.distiller import NonFiniteLossError
from vfmkd.distillation.online import measure_channel_stats
from vfmkd.engine.builders import (
    LiveTeachers, build_augment, build_dataset, build_distiller, build_model, build_router,
)
from vfmkd.engine.evaluator import evaluate
from vfmkd.engine.run_dir import create_run_dir, write_json, write_run_config
from vfmkd.engine.setup import (
    build_loader, class_names, detection_classes, make_optimizer, seed_everything, select_device, worker_count,
)
from vfmkd.engine.stages import build_stages, stage_of, staged_lr_lambda
from vfmkd.utils.checkpoint import save_checkpoint
from vfmkd.utils.logging import setup_logging
from vfmkd.utils.plots import plot_training_curves

__all__ = ["Trainer"]


class Trainer:
    """Builds everything from a resolved experiment config and runs ``fit()``.

    The run directory holds ``config.yaml``, ``train.log``, ``checkpoints/{last,best}.pt``,
    ``metrics.json`` (per-epoch stage, losses, cosines, val mAP and held-out fidelity) and
    TensorBoard events.
    """

    def __init__(self, cfg: Dict[str, Any], run_dir: Optional[Path] = None, progress: bool = True) -> None:
        self.cfg = cfg  # the resolved config as loaded: saved into the run directory and checkpoints
        exp = experiment_record(cfg)
        self.exp = exp
        self.train_cfg, self.dist_cfg, self.eval_cfg = exp.train, exp.distillation, exp.eval
        self.progress = progress
        data, train = exp.data, exp.train
        seed_everything(train.seed)  # first: the student's initial weights follow train.seed
        # Checks that need no run directory come first, so a mistake leaves no empty run behind.
        self.device = select_device(train.device)
        self.num_classes = detection_classes(exp.model.heads)
        self.stages = build_stages(train)
        self.augment = build_augment(data)
        self.train_set = build_dataset(data, data.train_split, self.num_classes, self.augment, train.seed)
        self.val_set = build_dataset(data, data.val_split, self.num_classes)
        self.live = LiveTeachers(exp.teachers, self.device)
        self.router = build_router(exp, self.train_set, self.live, self.augment)
        self.model = build_model(exp.model)
        self.run_dir = run_dir or create_run_dir(resolve_path(exp.work_dir), exp.experiment_name)
        self.log = setup_logging(self.run_dir / "train.log")
        write_run_config(self.run_dir, cfg)
        self.log.info("run directory: %s", self.run_dir)
        self.router.load_live_models()
        self.model = self.model.to(self.device)
        self.distiller = build_distiller(exp.distillation, self.model, self.router).to(self.device)
        for stage in self.stages:  # a typo in a stage fails now, not epochs later
            self.distiller.set_stage(stage.losses, stage.weights)
        distilled = list(self.distiller.teachers_used(active_only=False))
        unused = set(self.router.sources) - set(distilled)
        if unused:
            self.log.warning("enabled teacher(s) %s have no loss in distillation.losses and are ignored", sorted(unused))
        self.names = class_names(data.root, self.num_classes)
        workers = worker_count(data.num_workers)
        caches = {n: s.cache for n, s in self.router.sources.items() if s.cache is not None}
        missing = {n: s.missing for n, s in self.router.sources.items()}
        self.train_loader = build_loader(CachedTargetsDataset(self.train_set, caches, missing),
                                         data.batch_size, workers, True, train.seed)
        self.val_router = None
        val_set: Any = self.val_set
        if self.eval_cfg.fidelity and distilled:
            self.val_router = build_router(exp, self.val_set, self.live, validation=True)
            self.val_router.load_live_models(distilled)
            val_caches = {n: s.cache for n, s in self.val_router.sources.items() if s.cache is not None}
            val_set = CachedTargetsDataset(self.val_set, val_caches, {n: s.missing for n, s in self.val_router.sources.items()})
        self.val_loader = build_loader(val_set, self.eval_cfg.batch_size, workers, False, train.seed)
        if self.dist_cfg.standardize:
            self._set_standardisation()
        self.params = [p for p in list(self.model.parameters()) + list(self.distiller.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(self.params, train.optimizer, train.lr, train.momentum, train.weight_decay)
        steps_per_epoch = -(-len(self.train_loader) // train.accumulate)  # ceil: a partial group still steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, staged_lr_lambda(self.stages, steps_per_epoch, train.warmup_iters, train.lr))
        self.writer = SummaryWriter(log_dir=str(self.run_dir))
        self.history: List[Dict[str, Any]] = []
        self.best_fitness = -1.0
        self.step = 0  # micro-batches seen
        n_params = sum(p.numel() for p in self.model.parameters())
        modes = {n: ("offline" if s.cache is not None else "online") + (", live model loaded" if s.live and s.cache else "")
                 for n, s in self.router.sources.items()}
        self.log.info(
            "student %s (%.2fM params) on %s; %d train / %d val images; teachers: %s; offline_ratio=%s; stages: %s",
            exp.model.backbone["type"], n_params / 1e6, self.device, len(self.train_set), len(self.val_set),
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
                    self.log.warning("teacher %s: no per-channel stats for %s (older cache): not standardised", name, feature)

    def _autocast(self):
        if not self.train_cfg.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, item: DistillBatch, interval: int) -> Dict[str, float]:
        """Forward + backward of one micro-batch (the optimizer step is the caller's)."""
        batch = item.batch.to(self.device)
        teachers = list(self.distiller.teachers_used())
        targets = self.router.targets(self.step, batch, item.cached, teachers) if self.step % interval == 0 else {}
        with self._autocast():
            out = self.model(batch.images)
        result = self.distiller(out, batch, targets)
        (result.total / self.train_cfg.accumulate).backward()
        self.step += 1
        return result.logs

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        self.model.train()
        self.distiller.train()
        self.train_loader.dataset.set_epoch(epoch)
        train_cfg, interval = self.train_cfg, self.dist_cfg.distill_interval
        accumulate = train_cfg.accumulate
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{train_cfg.epochs}", disable=not self.progress)
        self.optimizer.zero_grad(set_to_none=True)
        for i, item in enumerate(bar):
            logs = self.train_step(item, interval)
            if (i + 1) % accumulate == 0 or i + 1 == len(self.train_loader):
                # Clip what the optimizer trains: the student and the distillation adapters.
                torch.nn.utils.clip_grad_norm_(self.params, train_cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k == "loss" or k.startswith("cos_")})
            if self.step % train_cfg.log_interval == 0:
                for k, v in logs.items():
                    self.writer.add_scalar(f"train/{k}", v, self.step)
                self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
        return {k: v / counts[k] for k, v in sums.items()}

    def evaluate(self) -> Dict[str, Any]:
        e = self.eval_cfg
        return evaluate(self.model, self.val_loader, self.names, self.device, e.conf, e.iou, e.max_det,
                        progress=self.progress, distiller=self.distiller if self.val_router else None,
                        router=self.val_router)

    def save(self, name: str, epoch: int, metrics: Dict[str, Any]) -> Path:
        return save_checkpoint(self.run_dir / "checkpoints" / name, {
            "model": self.model.state_dict(),
            "distiller": self.distiller.state_dict(),
            "teacher_stats": self.distiller.teacher_stats(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "config": self.cfg,
            "metrics": metrics,
        })

    def fit(self) -> Dict[str, Any]:
        train_cfg = self.train_cfg
        start = time.time()
        current = None
        for epoch in range(1, (train_cfg.epochs or 0) + 1):
            stage = stage_of(self.stages, epoch)
            if stage is not current:
                self.distiller.set_stage(stage.losses, stage.weights)
                self.best_fitness = -1.0  # best.pt is chosen within the last stage
                self.log.info("stage %s: epochs %d-%d, losses %s, lr %g", stage.name, stage.first_epoch,
                              stage.last_epoch, ", ".join(stage.losses) if stage.losses is not None else "all", stage.lr)
                current = stage
            try:
                epoch_logs = self.train_one_epoch(epoch)
            except NonFiniteLossError:
                # The step was refused before the optimizer ran, so the weights are still finite.
                path = self.save("last.pt", epoch, {"epoch": epoch, "interrupted": "non-finite loss"})
                self.log.error("non-finite loss in epoch %d; weights saved to %s", epoch, path)
                raise
            record: Dict[str, Any] = {"epoch": epoch, "stage": stage.name, "train": epoch_logs,
                                      "teacher_batches": self.router.summary()}
            if epoch % train_cfg.eval_interval == 0 or epoch == stage.last_epoch:
                val = self.evaluate()
                record["val"] = val
                for k in ("mAP50", "mAP50-95", "precision", "recall"):
                    self.writer.add_scalar(f"val/{k}", val[k], epoch)
                for key, value in val.get("fidelity", {}).items():
                    self.writer.add_scalar(f"val/cos_{key}", value["cos"], epoch)
                fitness = 0.1 * val["mAP50"] + 0.9 * val["mAP50-95"]  # ultralytics' fitness
                if stage is self.stages[-1] and fitness >= self.best_fitness:
                    self.best_fitness = fitness
                    self.save("best.pt", epoch, record)
                    record["best"] = True
            self.save("last.pt", epoch, record)
            self.history.append(record)
            self._log_epoch(record)
            self._write_metrics(time.time() - start)
        self.writer.close()
        plot_training_curves(self.history, self.run_dir / "training_curves.png")
        return self._write_metrics(time.time() - start)

    def _log_epoch(self, record: Dict[str, Any]) -> None:
        summary = "  ".join(f"{k}={v:.4f}" for k, v in record["train"].items() if not k.startswith("loss_det_"))
        val = record.get("val")
        val_text = f"  val mAP50={val['mAP50']:.4f} mAP50-95={val['mAP50-95']:.4f}" if val else ""
        if val and val.get("fidelity"):
            val_text += "  held-out " + "  ".join(f"cos[{k}]={v['cos']:.4f}" for k, v in val["fidelity"].items())
        self.log.info("epoch %d/%d [%s]  %s%s", record["epoch"], self.train_cfg.epochs, record["stage"], summary, val_text)
        for name, counts in self.router.summary().items():
            self.log.info("teacher %s batches so far: %s", name, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

    def _write_metrics(self, seconds: float) -> Dict[str, Any]:
        best = next((r for r in reversed(self.history) if r.get("best")), None)
        last_val = next((r["val"] for r in reversed(self.history) if "val" in r), None)
        metrics = {
            "experiment": self.exp.experiment_name,
            "stages": [s.describe() for s in self.stages],
            "epochs": self.history,
            "best_epoch": best["epoch"] if best else None,
            "best_val": best["val"] if best else None,
            "final_fidelity": last_val.get("fidelity") if last_val else None,
            "train_seconds": round(seconds, 1),
        }
        write_json(self.run_dir / "metrics.json", metrics)
        return metrics
