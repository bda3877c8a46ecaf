"""The training loop: student + task heads + feature distillation from cached and live teachers."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import vfmkd.teachers  # noqa: F401  (registers the teachers)
from vfmkd.core.config import resolve_path
from vfmkd.core.evaluator import evaluate_detection
from vfmkd.core.run_dir import create_run_dir, write_json, write_run_config
from vfmkd.core.train_setup import (
    build_loader, class_names, detection_classes, lr_lambda, make_optimizer, seed_everything, select_device,
)
from vfmkd.datasets import DetectionDataset, GeometricAugment
from vfmkd.distillation.distiller import Distiller, NonFiniteLossError
from vfmkd.distillation.mixer import TeacherMixer, why_not_offline
from vfmkd.distillation.online import measure_channel_stats
from vfmkd.distillation.sources import TeacherSource, load_live_models, open_teacher_sources
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.utils.logging import setup_logging
from vfmkd.utils.plots import plot_training_curves

__all__ = ["Trainer"]


class Trainer:
    """Builds everything from a resolved experiment config and runs ``fit()``.

    The run directory holds ``config.yaml``, ``train.log``, ``checkpoints/{last,best}.pt``,
    ``metrics.json`` (per-epoch losses, cosines and val mAP) and TensorBoard events.
    """

    def __init__(self, cfg: Dict[str, Any], run_dir: Optional[Path] = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        data, dist, train = cfg["data"], cfg["distillation"], cfg["train"]
        # Checks that need no run directory come first, so a mistake leaves no empty run behind.
        self.device = select_device(train["device"])
        self.num_classes = detection_classes(cfg)
        augment = GeometricAugment(**data["augment"])
        self.augment = augment if augment.enabled else None
        self.sources: Dict[str, TeacherSource] = open_teacher_sources(
            cfg["teachers"], data["dataset"], data["train_split"], dist["missing_cache"]
        )
        self.run_dir = run_dir or create_run_dir(resolve_path(cfg["work_dir"]), cfg["experiment_name"])
        self.log = setup_logging(self.run_dir / "train.log")
        write_run_config(self.run_dir, cfg)
        self.log.info("run directory: %s", self.run_dir)
        seed_everything(train["seed"])
        self.names = class_names(data, self.num_classes)
        caches = {n: str(s.cache.split_file(data["train_split"])) for n, s in self.sources.items() if s.cache}
        root = str(resolve_path(data["root"]))
        self.train_set = DetectionDataset(
            root, data["train_split"], data["img_size"], data["limit"], self.num_classes, teacher_caches=caches,
            augment=self.augment, seed=train["seed"], allow_missing_features=dist["missing_cache"] == "online",
            offline_max_shift=dist["offline_max_shift"], offline_crops=dist["offline_crops"],
        )
        self.val_set = DetectionDataset(root, data["val_split"], data["img_size"], data["limit"], self.num_classes)
        load_live_models(self.sources, dist["offline_ratio"], self.augment, self.train_set.missing, self.device)
        self.model = UnifiedModel.from_config(cfg["model"]).to(self.device)
        self.distiller = Distiller(
            self.model, dist["losses"], {n: s.specs for n, s in self.sources.items()},
            {n: s.primary_feature for n, s in self.sources.items()},
            alpha=dist["alpha"], beta=dist["beta"], gamma=dist["gamma"],
        ).to(self.device)
        unused = set(self.sources) - set(self.distiller.teachers_used())
        if unused:
            self.log.warning("enabled teacher(s) %s have no loss in distillation.losses and are ignored", sorted(unused))
        seed = train["seed"]
        self.train_loader = build_loader(self.train_set, data["batch_size"], data["num_workers"], True, seed)
        self.val_loader = build_loader(self.val_set, cfg["eval"]["batch_size"], data["num_workers"], False, seed)
        if dist["standardize"]:
            self._set_standardisation()
        self.mixer = TeacherMixer(dist["offline_ratio"], seed, {n: s.offline for n, s in self.sources.items()})
        params = [p for p in list(self.model.parameters()) + list(self.distiller.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(params, train)
        total = train["epochs"] * max(1, len(self.train_loader) // train["accumulate"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total, min(train["warmup_iters"], max(1, total // 3)))
        )
        self.writer = SummaryWriter(log_dir=str(self.run_dir))
        self.history: List[Dict[str, Any]] = []
        self.best_fitness = -1.0
        self.step = 0  # micro-batches seen
        n_params = sum(p.numel() for p in self.model.parameters())
        modes = {n: ("offline" if s.offline else "online") + (", live model loaded" if s.online and s.offline else "")
                 for n, s in self.sources.items()}
        self.log.info(
            "student %s (%.2fM params) on %s; %d train / %d val images; teachers: %s; offline_ratio=%s",
            cfg["model"]["backbone"]["type"], n_params / 1e6, self.device, len(self.train_set), len(self.val_set),
            ", ".join(f"{n} ({m})" for n, m in modes.items()) or "none", dist["offline_ratio"],
        )

    def _set_standardisation(self) -> None:
        """Per-channel stats from each cache; online-only teachers measure theirs on a few images."""
        plain = DetectionDataset(str(resolve_path(self.cfg["data"]["root"])), self.cfg["data"]["train_split"],
                                 self.cfg["data"]["img_size"], self.cfg["data"]["limit"], self.num_classes)
        for name, src in self.sources.items():
            stats = dict(src.stats)
            missing = [f for f in self.distiller.features_used(name) if f not in stats]
            if missing and src.online is not None:
                loader = build_loader(plain, 8, 0, False, self.cfg["train"]["seed"])
                stats.update(measure_channel_stats(src.online, loader))
                self.log.info("teacher %s: per-channel stats of %s measured on up to 32 training images", name, missing)
            for feature in self.distiller.features_used(name):
                if feature in stats:
                    self.distiller.set_teacher_stats(name, feature, *stats[feature])
                else:
                    self.log.warning("teacher %s: no per-channel stats for %s (older cache): not standardised", name, feature)

    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        moved = dict(batch)
        for key in ("images", "cls", "bboxes", "batch_idx", "affine"):
            moved[key] = batch[key].to(self.device, non_blocking=True)
        return moved

    def teacher_targets(self, batch: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
        """Per distilled teacher: the cached features of this batch or a live pass, as the mixer says."""
        targets: Dict[str, Dict[str, Any]] = {}
        for name in self.distiller.teachers_used():
            src = self.sources[name]
            cached = batch["teachers"].get(name)
            reason = why_not_offline(cached, batch) if cached is not None else ""
            decision = self.mixer.decide(self.step, name, cached, reason)
            if decision.mode == "offline":
                targets[name] = dict(cached, student_affine=batch["affine"])
            elif src.online is None:  # cannot happen when TeacherSource.can_go_online is right
                raise RuntimeError(f"teacher {name} needs a live pass ({decision.reason}) but its model is not loaded")
            else:
                targets[name] = src.online.targets(batch)
        return targets

    def _autocast(self):
        if not self.cfg["train"]["amp"]:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        self.model.train()
        self.distiller.train()
        self.train_set.set_epoch(epoch)
        train_cfg, interval = self.cfg["train"], self.cfg["distillation"]["distill_interval"]
        accumulate = train_cfg["accumulate"]
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{train_cfg['epochs']}", disable=not self.progress)
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            batch = self._to_device(batch)
            targets = self.teacher_targets(batch) if self.step % interval == 0 else {}
            with self._autocast():
                out = self.model(batch["images"])
            loss, logs = self.distiller(out, batch, targets)
            (loss / accumulate).backward()
            self.step += 1
            if (i + 1) % accumulate == 0 or i + 1 == len(self.train_loader):
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), train_cfg["grad_clip"])
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k == "loss" or k.startswith("cos_")})
            if self.step % train_cfg["log_interval"] == 0:
                for k, v in logs.items():
                    self.writer.add_scalar(f"train/{k}", v, self.step)
                self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
        return {k: v / counts[k] for k, v in sums.items()}

    def evaluate(self) -> Dict[str, float]:
        return evaluate_detection(
            self.model, self.val_loader, self.names, self.device,
            conf=self.cfg["eval"]["conf"], iou=self.cfg["eval"]["iou"], max_det=self.cfg["eval"]["max_det"],
            progress=self.progress,
        )

    def save(self, name: str, epoch: int, metrics: Dict[str, Any]) -> Path:
        path = self.run_dir / "checkpoints" / name
        torch.save(
            {
                "model": self.model.state_dict(),
                "distiller": self.distiller.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": epoch,
                "config": self.cfg,
                "metrics": metrics,
            },
            path,
        )
        return path

    def fit(self) -> Dict[str, Any]:
        train_cfg = self.cfg["train"]
        start = time.time()
        for epoch in range(1, train_cfg["epochs"] + 1):
            try:
                epoch_logs = self.train_one_epoch(epoch)
            except NonFiniteLossError:
                # The step was refused before the optimizer ran, so the weights are still finite.
                path = self.save("last.pt", epoch, {"epoch": epoch, "interrupted": "non-finite loss"})
                self.log.error("non-finite loss in epoch %d; weights saved to %s", epoch, path)
                raise
            record: Dict[str, Any] = {"epoch": epoch, "train": epoch_logs, "teacher_batches": self.mixer.summary()}
            if epoch % train_cfg["eval_interval"] == 0 or epoch == train_cfg["epochs"]:
                val = self.evaluate()
                record["val"] = val
                for k in ("mAP50", "mAP50-95", "precision", "recall"):
                    self.writer.add_scalar(f"val/{k}", val[k], epoch)
                fitness = 0.1 * val["mAP50"] + 0.9 * val["mAP50-95"]  # ultralytics' fitness
                if fitness >= self.best_fitness:
                    self.best_fitness = fitness
                    self.save("best.pt", epoch, record)
                    record["best"] = True
            self.save("last.pt", epoch, record)
            self.history.append(record)
            summary = "  ".join(f"{k}={v:.4f}" for k, v in epoch_logs.items() if not k.startswith("loss_det_"))
            val_text = f"  val mAP50={record['val']['mAP50']:.4f} mAP50-95={record['val']['mAP50-95']:.4f}" if "val" in record else ""
            self.log.info("epoch %d/%d  %s%s", epoch, train_cfg["epochs"], summary, val_text)
            for name, counts in self.mixer.summary().items():
                self.log.info("teacher %s batches so far: %s", name, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            self._write_metrics(time.time() - start)
        self.writer.close()
        plot_training_curves(self.history, self.run_dir / "training_curves.png")
        return self._write_metrics(time.time() - start)

    def _write_metrics(self, seconds: float) -> Dict[str, Any]:
        best = next((r for r in reversed(self.history) if r.get("best")), None)
        metrics = {
            "experiment": self.cfg["experiment_name"],
            "epochs": self.history,
            "best_epoch": best["epoch"] if best else None,
            "best_val": best["val"] if best else None,
            "train_seconds": round(seconds, 1),
        }
        write_json(self.run_dir / "metrics.json", metrics)
        return metrics
