"""The fine-tuning config (``configs/finetune/*.yaml``): a dataclass schema OmegaConf checks keys and
types against, YAML plus dotted ``key=value`` overrides like ``tools/train.py``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from vfmkd.core.config import apply_overrides, merge_with_schema, read_yaml, resolve_component
from vfmkd.core.errors import ConfigError

PROMPT_KINDS = ("box", "points")


@dataclass
class LoraSection:
    rank: int = 4  # r of the adapters on every image-encoder block's attn.qkv
    alpha: float = 4.0  # scaling = alpha / rank (the teacher reads it from the written file)


@dataclass
class FinetuneData:
    root: str = "datasets/coco128"  # vfmkd's folder layout with instance_segmentation labels
    train_split: str = "train2017"
    val_split: str = "val2017"  # held-out images: the teacher's Dice/IoU before fine-tuning and after each epoch
    limit: Optional[int] = None  # first N training images
    val_limit: Optional[int] = 32  # first N held-out images
    classes: List[str] = field(default_factory=list)  # detection class names prompted (e.g. [person]); [] = all


@dataclass
class FinetuneTrain:
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 2  # images per step (every prompted instance of them)
    max_prompts: int = 16  # instances prompted per image and step (a random subset beyond that)
    prompts: List[str] = field(default_factory=lambda: ["box", "points"])  # per image and step, one at random
    num_points: int = 1  # foreground points sampled inside the mask for a points prompt
    train_decoder: bool = True  # also fine-tune SAM's mask decoder (saved in the file; the prompt encoder stays)
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0


@dataclass
class FinetuneConfig:
    experiment_name: str = "finetune_sam_lora"
    work_dir: str = "work_dirs"  # the run lives in <work_dir>/<experiment_name>/ (--resume continues it)
    # keyword arguments of the base SAM (vfmkd.teachers.sam_teacher.SamTeacher), or {config: configs/teachers/sam.yaml}
    teacher: Dict[str, Any] = field(default_factory=lambda: {"config": "configs/teachers/sam.yaml"})
    lora: LoraSection = field(default_factory=LoraSection)
    data: FinetuneData = field(default_factory=FinetuneData)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)


def load_finetune_config(path: str | Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The validated config of ``path`` with ``overrides``; the teacher entry merged over its ``config`` file."""
    cfg = merge_with_schema(FinetuneConfig, read_yaml(path), source=str(path))
    apply_overrides(cfg, overrides, FinetuneConfig, str(path))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    teacher = resolve_component(resolved["teacher"], "teacher")
    teacher.pop("config", None)
    if teacher.pop("type", "sam") != "sam":
        raise ConfigError(f"{path}: teacher must be a base SAM (type: sam, e.g. config: configs/teachers/sam.yaml): "
                          "LoRA fine-tuning adapts segment-anything v1's image encoder (SAM2 is not supported).")
    resolved["teacher"] = teacher
    _check(resolved, str(path))
    return resolved


def _check(cfg: Dict[str, Any], source: str) -> None:
    train, lora = cfg["train"], cfg["lora"]
    bad = [k for k in train["prompts"] if k not in PROMPT_KINDS]
    if bad or not train["prompts"]:
        raise ConfigError(f"{source}: train.prompts={train['prompts']}: choose one or more of {list(PROMPT_KINDS)}")
    for key, value in (("lora.rank", lora["rank"]), ("train.epochs", train["epochs"]),
                       ("train.batch_size", train["batch_size"]), ("train.max_prompts", train["max_prompts"]),
                       ("train.num_points", train["num_points"])):
        if value < 1:
            raise ConfigError(f"{source}: {key} must be >= 1, got {value}")
    if not lora["alpha"] > 0 or not train["lr"] > 0:
        raise ConfigError(f"{source}: lora.alpha and train.lr must be > 0, got {lora['alpha']} and {train['lr']}")
