"""The LoRA fine-tuning loop of a SAM teacher: prompts from the labels, BCE + Dice against the ground-truth
masks, the held-out Dice/IoU before fine-tuning and after every epoch, and a checkpoint per epoch
(``checkpoints/last.pt`` to resume, ``lora_sam.pt`` for the ``lora_sam`` teacher), each written atomically."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vfmkd.core.errors import ConfigError, NonFiniteLossError
from vfmkd.engine.finetune.lora import attach_lora, load_lora_state, lora_state, write_teacher_file
from vfmkd.engine.finetune.prompts import PromptedImage, PromptedMaskSet, Prompts, box_prompts, sample_prompts
from vfmkd.engine.training.run_dir import write_json
from vfmkd.teachers.sam_teacher import SamTeacher
from vfmkd.utils.checkpoint import load_checkpoint, save_checkpoint

TEACHER_FILE = "lora_sam.pt"
LAST = Path("checkpoints") / "last.pt"
_RESUME_SECTIONS = ("teacher", "lora", "data")  # what a resumed run may not change (train.epochs may grow)


def mask_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, bce_weight: float,
              dice_weight: float) -> torch.Tensor:
    """``bce_weight * BCE + dice_weight * (1 - soft Dice)`` of logits (k, h, w) vs {0, 1} targets (k, h, w),
    over the ``valid`` (h, w) pixels; the Dice term is averaged over the k masks."""
    w = valid.to(logits.dtype).expand_as(target)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).sum() / w.sum().clamp_min(1)
    prob, tgt = torch.sigmoid(logits) * w, target * w
    dice = (2 * (prob * tgt).sum((1, 2)) + 1) / (prob.sum((1, 2)) + tgt.sum((1, 2)) + 1)
    return bce_weight * bce + dice_weight * (1 - dice).mean()


class Finetuner:
    """LoRA on every image-encoder ``attn.qkv`` of a base SAM (frozen), optionally its mask decoder,
    trained on ``cfg`` (:class:`~vfmkd.engine.finetune.config.FinetuneConfig`, resolved) in ``run_dir``.
    ``resume``: continue from ``run_dir/checkpoints/last.pt`` (epoch boundaries)."""

    def __init__(self, cfg: Dict[str, Any], run_dir: Path, resume: bool = False, progress: bool = True,
                 log: Optional[logging.Logger] = None) -> None:
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = log or logging.getLogger("vfmkd")
        train, data = cfg["train"], cfg["data"]
        torch.manual_seed(train["seed"])
        self.teacher = SamTeacher(**cfg["teacher"])
        self.sam, self.device = self.teacher.sam, self.teacher.device
        self.adapters = attach_lora(self.sam, cfg["lora"]["rank"], cfg["lora"]["alpha"])
        params = [p for a in self.adapters for p in (a.lora_A, a.lora_B)]
        if train["train_decoder"]:
            self.sam.mask_decoder.requires_grad_(True)
            params += list(self.sam.mask_decoder.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])
        size = self.teacher.input_size
        self.train_set = PromptedMaskSet(data["root"], data["train_split"], size, self.teacher.preprocess,
                                         data["classes"], data["limit"])
        self.val_set = PromptedMaskSet(data["root"], data["val_split"], size, self.teacher.preprocess,
                                       data["classes"], data["val_limit"])
        self.generator = torch.Generator().manual_seed(train["seed"])
        self.history: List[Dict[str, Any]] = []
        self.epoch = 0
        if resume:
            self._resume()

    # ------------------------------------------------------------------ model
    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> SAM image embeddings (B, 256, S/16, S/16), through the LoRA-adapted encoder."""
        with self.teacher.autocast():
            return self.sam.image_encoder(pixels.to(self.device))

    def _logits(self, embedding: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """One image's embedding (1, 256, g, g) and its prompts -> (k, S/4, S/4) float32 mask logits."""
        pe = self.sam.prompt_encoder
        points = None
        if prompts.points is not None:
            points = (prompts.points.to(self.device), prompts.labels.to(self.device))
        boxes = prompts.boxes.to(self.device) if prompts.boxes is not None else None
        with self.teacher.autocast():
            sparse, dense = pe(points=points, boxes=boxes, masks=None)
            low_res, _ = self.sam.mask_decoder(image_embeddings=embedding, image_pe=pe.get_dense_pe(),
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=False)
        return low_res[:, 0].float()

    # ------------------------------------------------------------------ loop
    def fit(self) -> List[Dict[str, Any]]:
        """Validate the base model (epoch 0), then train and validate every epoch; returns the history."""
        if not self.history:
            self._record({"epoch": 0, "train_loss": None, **self.validate()}, "before fine-tuning")
        for epoch in range(self.epoch + 1, self.cfg["train"]["epochs"] + 1):
            start = time.time()
            loss = self._train_epoch(epoch)
            row = {"epoch": epoch, "train_loss": loss, **self.validate(), "seconds": time.time() - start}
            if torch.cuda.is_available():
                row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            self.epoch = epoch
            self._record(row, f"epoch {epoch}")
            self._save()
        return self.history

    def _train_epoch(self, epoch: int) -> float:
        train = self.cfg["train"]
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(train["seed"] + epoch))
        steps = order.split(train["batch_size"])
        total, count = 0.0, 0
        bar = tqdm(steps, desc=f"finetune epoch {epoch}", disable=not self.progress, leave=False)
        for rows in bar:
            items = [it for it in (self.train_set[int(i)] for i in rows) if len(it.masks)]
            if not items:
                continue
            loss = self._step(items)
            total, count = total + loss, count + 1
            bar.set_postfix(loss=f"{loss:.4f}")
        return total / max(count, 1)

    def _step(self, items: List[PromptedImage]) -> float:
        train = self.cfg["train"]
        embeddings = self._embed(torch.stack([it.pixels for it in items]))
        losses = []
        for b, item in enumerate(items):
            prompts = sample_prompts(item, train["prompts"], train["num_points"], train["max_prompts"], self.generator)
            logits = self._logits(embeddings[b:b + 1], prompts)
            target = item.masks[prompts.index].to(self.device)
            losses.append(mask_loss(logits, target, item.valid.to(self.device), train["bce_weight"],
                                    train["dice_weight"]))
        loss = torch.stack(losses).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"the fine-tuning loss became {loss.item()} (epoch {self.epoch + 1}); lower "
                                     f"train.lr (now {train['lr']}) or train.grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, train["grad_clip"])
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Held-out ``val_dice`` / ``val_iou``: mean over instances of the box-prompted mask (logit > 0) vs
        the ground truth, on image content in the low-res mask frame; ``val_instances``: how many."""
        dice, iou = [], []
        for index in tqdm(range(len(self.val_set)), desc="validate", disable=not self.progress, leave=False):
            item = self.val_set[index]
            if not len(item.masks):
                continue
            pred = self._logits(self._embed(item.pixels[None]), box_prompts(item)).cpu() > 0
            pred &= item.valid
            gt = item.masks > 0.5
            inter = (pred & gt).flatten(1).sum(1).float()
            p_sum, g_sum = pred.flatten(1).sum(1).float(), gt.flatten(1).sum(1).float()
            dice.append(2 * inter / (p_sum + g_sum).clamp_min(1))
            iou.append(inter / (p_sum + g_sum - inter).clamp_min(1))
        if not dice:
            raise ConfigError("no held-out instance to validate on: data.val_split/val_limit/classes select none")
        d, i = torch.cat(dice), torch.cat(iou)
        return {"val_dice": float(d.mean()), "val_iou": float(i.mean()), "val_instances": int(len(d))}

    # ------------------------------------------------------------------ records
    def _record(self, row: Dict[str, Any], what: str) -> None:
        self.history.append(row)
        loss = "" if row["train_loss"] is None else f"train loss {row['train_loss']:.4f}, "
        self.log.info("%s: %sheld-out Dice %.4f IoU %.4f (%d instances)", what, loss, row["val_dice"],
                      row["val_iou"], row["val_instances"])
        write_json(self.run_dir / "metrics.json", {"history": self.history})

    def _save(self) -> None:
        """``checkpoints/last.pt`` (resume) and ``lora_sam.pt`` (the teacher), both atomic."""
        decoder = self.sam.mask_decoder if self.cfg["train"]["train_decoder"] else None
        write_teacher_file(self.run_dir / TEACHER_FILE, self.adapters, self.cfg["lora"]["rank"],
                           self.cfg["lora"]["alpha"], self.teacher.variant, self.cfg["teacher"].get("checkpoint"),
                           decoder)
        (self.run_dir / LAST).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.run_dir / LAST, {
            "epoch": self.epoch, "lora": lora_state(self.adapters), "optimizer": self.optimizer.state_dict(),
            "mask_decoder": {k: v.detach().cpu() for k, v in self.sam.mask_decoder.state_dict().items()},
            "history": self.history, "generator": self.generator.get_state(), "config": self.cfg})

    def _resume(self) -> None:
        path = self.run_dir / LAST
        if not path.is_file():
            raise ConfigError(f"--resume: {path} does not exist (no epoch of this run finished); start it without "
                              "--resume")
        state = load_checkpoint(path)
        changed = [s for s in _RESUME_SECTIONS if state["config"][s] != self.cfg[s]]
        changed += [f"train.{k}" for k, v in self.cfg["train"].items()
                    if k != "epochs" and state["config"]["train"].get(k) != v]
        if changed:
            raise ConfigError(f"--resume: {', '.join(changed)} differ from the run in {self.run_dir}; only "
                              "train.epochs may change (start a new run under another experiment_name)")
        load_lora_state(self.adapters, state["lora"])
        self.sam.mask_decoder.load_state_dict(state["mask_decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history, self.epoch = list(state["history"]), int(state["epoch"])
        self.log.info("resumed %s after epoch %d", self.run_dir, self.epoch)
