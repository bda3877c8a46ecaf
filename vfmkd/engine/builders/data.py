"""Builders of the data: the dataset of a split (the label kinds its heads' tasks need), its augmentation,
the head-task and class checks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from vfmkd.core.config import read_yaml, resolve_path
from vfmkd.core.config_schema import DataConfig, ModelConfig
from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import HEADS, LOSSES
from vfmkd.datasets import DetectionDataset, GeometricAugment
from vfmkd.datasets.sources import IMAGE_SUFFIXES, find_images, open_split
from vfmkd.distillation.losses.task import DEFAULT_HEAD
from vfmkd.tasks import get_task, label_kinds_of, tasks_of
from vfmkd.utils.logging import get_logger


def build_augment(data: DataConfig) -> Optional[GeometricAugment]:
    a = data.augment
    augment = GeometricAugment(fliplr=a.fliplr, scale=a.scale, translate=a.translate, degrees=a.degrees)
    return augment if augment.enabled else None


def head_tasks(model: Union[ModelConfig, Mapping[str, Any]]) -> Dict[str, str]:
    """Head name -> the name of its task (a registered :class:`~vfmkd.tasks.Task`), from the registry."""
    heads = model.heads if isinstance(model, ModelConfig) else model.get("heads", {})
    return {name: task.name for name, task in tasks_of(head_classes(heads)).items()}


def head_classes(heads: Mapping[str, Mapping[str, Any]]) -> Dict[str, type]:
    """Head name -> the registered class its ``type`` names (``model.heads`` entries)."""
    return {name: HEADS.get(entry["type"]) for name, entry in heads.items()}


def box_classes_key(heads: Mapping[str, Mapping[str, Any]]) -> str:
    """The setting(s) behind the box class count: ``model.heads.<name>.num_classes`` of each box head."""
    names = [n for n, task in tasks_of(head_classes(heads)).items() if task.box_classes]
    return " and ".join(f"model.heads.{n}.num_classes" for n in names) or "model.heads.<box head>.num_classes"


def check_head_classes(heads: Mapping[str, Mapping[str, Any]], dataset: DetectionDataset) -> None:
    """A semantic head needs a logit per class of the dataset's table (else the loss indexes past its
    logits); more logits than classes train nothing and are only warned about."""
    for name, task in tasks_of(head_classes(heads)).items():
        want, have = dataset.semantic_num_classes, heads[name].get("num_classes")
        if not task.semantic_classes or want is None or have is None:
            continue
        table = dataset.semantic_table.source if dataset.semantic_table is not None else "the semantic table"
        if int(have) < want:
            raise ConfigError(f"model.heads.{name}.num_classes={have} but {table} has {want} semantic classes (index "
                              f"0, unlabeled, included): set model.heads.{name}.num_classes={want}")
        if int(have) > want:
            get_logger().warning("model.heads.%s.num_classes=%s but %s has %d semantic classes: %d logits are never "
                                 "trained",
                                 name, have, table, want, int(have) - want)


def build_dataset(data: DataConfig, split: str, num_classes: int,
                  augment: Optional[GeometricAugment] = None, seed: int = 0,
                  tasks: Sequence[str] = (),
                  heads: Optional[Mapping[str, Mapping[str, Any]]] = None,
                  losses: Optional[Mapping[str, Mapping[str, Any]]] = None) -> DetectionDataset:
    """The split with the labels the model's heads train on (``tasks``: the heads' task names; each
    task names the label kinds it needs, e.g. a promptable head reads instance masks: its points are
    drawn inside them and it is scored against them). With ``heads`` (``model.heads``) the class
    counts are checked against the dataset as it loads, and a class id beyond them names the head's key.
    With ``losses`` (``distillation.losses``, the train split) a task loss on a split without labels is refused."""
    kinds = label_kinds_of(get_task(t) for t in tasks)
    binary = "binary" in kinds
    if binary and not data.binary_classes:
        raise ConfigError("a binary_head needs data.binary_classes: the semantic class names that are foreground "
                          "(e.g. data.binary_classes=[person])")
    root, classes_key = resolve_path(data.root), box_classes_key(heads or {})
    source = open_split(data.format, root, split, num_classes, classes_key, split_json(data, split))
    extra = find_images(resolve_path(data.unlabelled)) if data.unlabelled and split == data.train_split else []
    if data.unlabelled and split == data.train_split and not extra:
        raise ConfigError(f"data.unlabelled={data.unlabelled}: no images ({'/'.join(IMAGE_SUFFIXES)}) below it")
    dataset = DetectionDataset(str(root), split, data.img_size, data.limit, num_classes,
                               augment=augment, seed=seed, instances="instances" in kinds,
                               semantic="semantic" in kinds,
                               binary_classes=tuple(data.binary_classes) if binary else (),
                               classes_key=classes_key, source=source, unlabelled=extra)
    check_labels_for_tasks(dataset, tasks, heads or {}, losses)
    if heads is not None:
        check_head_classes(heads, dataset)
    return dataset


def split_json(data: DataConfig, split: str) -> Optional[Path]:
    """The COCO instances JSON of ``split`` named by data.train_json / data.val_json (None: the default place)."""
    named = data.train_json if split == data.train_split else data.val_json if split == data.val_split else None
    return resolve_path(named) if named else None


def check_labels_for_tasks(dataset: DetectionDataset, tasks: Sequence[str], heads: Mapping[str, Mapping[str, Any]],
                           losses: Optional[Mapping[str, Mapping[str, Any]]]) -> None:
    """A split with no labelled image (a folder of unlabelled images): a task loss in ``losses`` is
    refused, naming it and its head's task (feature and output losses need no labels); without
    ``losses`` (validation, tools/test.py) the heads' task metrics are only warned about."""
    if any(dataset.labelled) or not tasks:
        return
    where = f"split {dataset.split} of {dataset.root} has no labels (all {len(dataset)} images unlabelled)"
    by_head = head_tasks({"heads": heads})
    for name, entry in (losses or {}).items():
        if getattr(LOSSES.get(entry["type"]), "kind", "") == "task":
            head = entry.get("head", DEFAULT_HEAD)
            raise ConfigError(f"task '{by_head.get(head, head)}' needs labels: distillation.losses.{name} trains "
                              f"model.heads.{head} on them, but {where}. Remove that loss (feature and output losses "
                              f"need no labels), or give labelled data as data.root with data.unlabelled=<this folder>")
    if losses is None:
        get_logger().warning("%s: the task metrics of %s score nothing; the held-out fidelity (cos) measures the "
                             "distillation", where, ", ".join(f"'{t}'" for t in dict.fromkeys(tasks)))


def detection_classes(heads: Mapping[str, Mapping[str, Any]]) -> int:
    """Box class count: ``num_classes`` of the detection (or instance) heads, which must agree; 80 (COCO)
    for a model without box heads (its box labels still prompt mask teachers)."""
    box_heads = [name for name, task in tasks_of(head_classes(heads)).items() if task.box_classes]
    counts = {name: int(heads[name].get("num_classes", 80)) for name in box_heads}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"model.heads: the box heads disagree on num_classes ({counts}); they read the same box "
                          "labels")
    return next(iter(counts.values()), 80)


def class_names(root: str, num_classes: int, table: Optional[Mapping[int, str]] = None) -> Dict[int, str]:
    """Names from ``table`` (a dataset's own class table: ``DetectionDataset.names``), else from the
    dataset's ``object_detection/config.yaml``, else numbers."""
    if table:
        return {i: str(table.get(i, i)) for i in range(num_classes)}
    path = resolve_path(Path(root) / "object_detection" / "config.yaml")
    names = read_yaml(path).get("names", {}) if path.is_file() else {}
    return {i: str(names.get(i, i)) for i in range(num_classes)}
