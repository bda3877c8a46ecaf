"""The training loop: student + task heads + feature distillation from cached teachers."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import vfmkd.teachers  # noqa: F401  (registers the teachers)
from vfmkd.core.config import read_yaml, resolve_path
from vfmkd.core.errors import ConfigError
from vfmkd.core.evaluator import evaluate_detection
from vfmkd.core.run_dir import create_run_dir, write_json, write_run_config
from vfmkd.datasets import DetectionDataset, collate_detection
from vfmkd.distillation.distiller import Distiller, NonFiniteLossError
from vfmkd.distillation.offline import OfflineTeacher, open_offline_teacher
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.utils.logging import setup_logging
from vfmkd.utils.plots import plot_training_curves


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
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_detection,
        generator=generator,
        persistent_workers=num_workers > 0,
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


class Trainer:
    """Builds everything from a resolved experiment config and runs ``fit()``.

    The run directory holds ``config.yaml``, ``train.log``, ``checkpoints/{last,best}.pt``,
    ``metrics.json`` (per-epoch losses, cosines and val mAP) and TensorBoard events.
    """

    def __init__(self, cfg: Dict[str, Any], run_dir: Optional[Path] = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        data = cfg["data"]
        # Checks that need no run directory come first, so a mistake leaves no empty run behind.
        self.device = select_device(cfg["train"]["device"])
        self.num_classes = detection_classes(cfg)
        self.teachers = self._open_teachers(data)
        self.run_dir = run_dir or create_run_dir(resolve_path(cfg["work_dir"]), cfg["experiment_name"])
        self.log = setup_logging(self.run_dir / "train.log")
        write_run_config(self.run_dir, cfg)
        self.log.info("run directory: %s", self.run_dir)
        seed_everything(cfg["train"]["seed"])
        self.names = class_names(data, self.num_classes)
        self.model = UnifiedModel.from_config(cfg["model"]).to(self.device)
        self.distiller = Distiller(
            self.model,
            cfg["distillation"]["losses"],
            {n: t.feature_specs for n, t in self.teachers.items()},
            {n: t.primary_feature for n, t in self.teachers.items()},
        ).to(self.device)
        unused = set(self.teachers) - set(self.distiller.teachers_used())
        if unused:
            self.log.warning("enabled teacher(s) %s have no loss in distillation.losses and are ignored", sorted(unused))
        caches = {n: str(t.split_file(data["train_split"])) for n, t in self.teachers.items()}
        root = str(resolve_path(data["root"]))
        self.train_set = DetectionDataset(
            root, data["train_split"], data["img_size"], data["limit"], self.num_classes, teacher_caches=caches
        )
        self.val_set = DetectionDataset(root, data["val_split"], data["img_size"], data["limit"], self.num_classes)
        seed = cfg["train"]["seed"]
        self.train_loader = build_loader(self.train_set, data["batch_size"], data["num_workers"], True, seed)
        self.val_loader = build_loader(self.val_set, cfg["eval"]["batch_size"], data["num_workers"], False, seed)
        params = [p for p in list(self.model.parameters()) + list(self.distiller.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(params, cfg["train"])
        total = cfg["train"]["epochs"] * len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total, min(cfg["train"]["warmup_iters"], max(1, total // 3)))
        )
        self.writer = SummaryWriter(log_dir=str(self.run_dir))
        self.history: List[Dict[str, Any]] = []
        self.best_fitness = -1.0
        self.step = 0
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log.info(
            "student %s (%.2fM params) on %s; %d train / %d val images; teachers: %s",
            cfg["model"]["backbone"]["type"], n_params / 1e6, self.device, len(self.train_set), len(self.val_set),
            ", ".join(f"{n} (offline, {t.input_size}px)" for n, t in self.teachers.items()) or "none",
        )

    def _open_teachers(self, data: Dict[str, Any]) -> Dict[str, OfflineTeacher]:
        teachers = {}
        for name, entry in self.cfg["teachers"].items():
            if not entry.get("enabled", True):
                continue
            if not entry.get("offline", True):
                raise ConfigError(
                    f"teachers.{name}.offline is false, but this version distils from cached features only; "
                    f"cache them with tools/prepare_teacher_features.py and set teachers.{name}.offline=true"
                )
            teachers[name] = open_offline_teacher(name, entry, data["dataset"], data["train_split"])
        return teachers

    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        moved = dict(batch)
        for key in ("images", "cls", "bboxes", "batch_idx", "affine"):
            moved[key] = batch[key].to(self.device, non_blocking=True)
        return moved

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        self.model.train()
        self.distiller.train()
        sums: Dict[str, float] = {}
        n = 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.cfg['train']['epochs']}", disable=not self.progress)
        for batch in bar:
            batch = self._to_device(batch)
            out = self.model(batch["images"])
            loss, logs = self.distiller(out, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["train"]["grad_clip"])
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            n += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k == "loss" or k.startswith("cos_")})
            if self.step % self.cfg["train"]["log_interval"] == 0:
                for k, v in logs.items():
                    self.writer.add_scalar(f"train/{k}", v, self.step)
                self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
        return {k: v / max(1, n) for k, v in sums.items()}

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
            record: Dict[str, Any] = {"epoch": epoch, "train": epoch_logs}
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
