"""Builders of the teachers: live models (built once per run), caches, the router of a split,
what each teacher offers the losses."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

import vfmkd.distillation.vfmkd_model_teacher  # noqa: F401  (registers the vfmkd_model teacher: a trained run)
import vfmkd.teachers  # noqa: F401  (registers the built-in teachers)
from vfmkd.cache.format import dataset_cli_args, rebuild_command
from vfmkd.core.config import resolve_path, teacher_kwargs
from vfmkd.core.config_schema import ExperimentConfig
from vfmkd.core.device import AUTO
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import TEACHERS
from vfmkd.datasets import DetectionDataset, GeometricAugment
from vfmkd.distillation.offline_distiller import (
    CacheMissingError,
    OfflineCacheSpec,
    OfflineTeacher,
    open_offline_teacher,
)
from vfmkd.distillation.online_distiller import OnlineTeacher
from vfmkd.distillation.routing import TeacherRouter, TeacherSource
from vfmkd.teachers.settings import teacher_keys
from vfmkd.utils.logging import get_logger


def enabled_teachers(teachers_cfg: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {name: dict(entry) for name, entry in teachers_cfg.items() if entry.get("enabled", True)}


class LiveTeachers:
    """Builds each teacher's live model at most once per run (training and validation share it)."""

    def __init__(self, teachers_cfg: Mapping[str, Mapping[str, Any]], device: torch.device) -> None:
        self.entries, self.device = enabled_teachers(teachers_cfg), device
        self._built: Dict[str, OnlineTeacher] = {}
        self._masks: set = set()

    def with_masks(self, names: Sequence[str]) -> None:
        """Live passes of ``names`` also prompt the teacher with the view's boxes for mask logits."""
        self._masks.update(names)
        for name in names:
            if name in self._built:
                self._built[name].masks = True

    def loader(self, name: str, cached_input_size: Optional[int]) -> Callable[[], OnlineTeacher]:
        def load() -> OnlineTeacher:
            if name not in self._built:
                entry = self.entries[name]
                kwargs = teacher_kwargs(entry)
                if self.device.type == "cuda" and _on_a_gpu(entry["type"], kwargs):
                    kwargs["device"] = str(self.device)  # one replica per rank, on that rank's GPU
                with teacher_keys(f"teachers.{name}"):
                    teacher = TEACHERS.build(entry["type"], where=f"teachers.{name}", **kwargs)
                self._built[name] = OnlineTeacher(name, teacher, self.device, masks=name in self._masks)
            live = self._built[name]
            if cached_input_size is not None and live.teacher.input_size != cached_input_size:
                raise ConfigError(f"teachers.{name}: live input_size {live.teacher.input_size} != cached "
                                  f"{cached_input_size}")
            return live
        return load


def _on_a_gpu(teacher_type: str, kwargs: Mapping[str, Any]) -> bool:
    """The teacher's ``device`` asks for a GPU (``cuda``, ``cuda:N``, or ``auto``, its default), so a
    training run puts it on the student's GPU."""
    if "device" not in inspect.signature(TEACHERS.get(teacher_type)).parameters:
        return False
    device = str(kwargs.get("device", AUTO))
    return device == AUTO or device.startswith("cuda")


def open_cache(name: str, entry: Mapping[str, Any], dataset: str, split: str,
               data_root: Optional[Any] = None) -> OfflineTeacher:
    """The teacher's cache of ``split``, checked against the teacher's config fingerprint and, when it
    holds mask logits and ``data_root`` is given, against the split's label files (stale prompts)."""
    if getattr(TEACHERS.get(entry["type"]), "live_only", False):
        raise ConfigError(f"teachers.{name}: the {entry['type']} teacher is live only (it runs on the student's own "
                          f"canvas); set teachers.{name}.offline=false")
    if not entry.get("feature_path"):
        raise ConfigError(f"teachers.{name}: offline: true needs feature_path (the --output of "
                          "prepare_teacher_features.py)")
    kwargs = teacher_kwargs(dict(entry))
    TEACHERS.check_kwargs(entry["type"], kwargs, f"teachers.{name}")
    teacher_cls = TEACHERS.get(entry["type"])
    path = resolve_path(entry["feature_path"]) / f"{split}.h5"
    rebuild = rebuild_command(entry["type"], dataset, split, str(entry["feature_path"]), teacher_config=entry)
    label_dir = resolve_path(data_root) / "object_detection" / "labels" / split if data_root is not None else None
    with teacher_keys(f"teachers.{name}"):
        fingerprint = teacher_cls.config_fingerprint(**kwargs)
    return open_offline_teacher(OfflineCacheSpec(
        name=name, path=path, fingerprint=fingerprint, primary_feature=teacher_cls.primary_feature, rebuild=rebuild,
        teacher_type=str(entry["type"]), teacher_settings=kwargs, label_dir=label_dir))


def build_router(cfg: ExperimentConfig, dataset: DetectionDataset, live: LiveTeachers,
                 augment: Optional[GeometricAugment] = None, validation: bool = False, rank: int = 0) -> TeacherRouter:
    """The router of one split. Training follows ``distillation`` (offline_ratio, missing_cache, the
    view gates). ``validation`` reads the split's cache where one exists (batches with images it
    lacks are skipped for that teacher) and asks the live teacher only when the split has no cache."""
    dist = cfg.distillation
    ratio = 1.0 if validation else float(dist.offline_ratio)
    allow_missing = validation or dist.missing_cache == "online"
    dataset_name, data_root = dataset_cli_args(dataset.root)
    sources: Dict[str, TeacherSource] = {}
    for name, entry in enabled_teachers(cfg.teachers).items():
        offline = bool(entry.get("offline", True))
        cache, missing, why_no_cache = None, frozenset(), ""
        if offline and ratio > 0.0:
            try:
                cache = open_cache(name, entry, cfg.data.dataset, dataset.split, dataset.root)
            except CacheMissingError as exc:
                if not allow_missing:
                    raise
                why_no_cache = "validation split not cached" if validation else "distillation.missing_cache=online"
                if not validation:
                    get_logger().warning("%s\nAll its batches go to the live teacher "
                                         "(distillation.missing_cache=online).", exc)
        elif offline:
            why_no_cache = "offline_ratio=0: a pure live run"
        if cache is not None:
            missing = cache.missing_images(dataset.image_ids, dataset.orig_sizes, allow_missing, data_root,
                                           dataset.limit)
        type_cls = TEACHERS.get(entry["type"])
        sources[name] = TeacherSource(
            name=name, offline=offline, cache=cache, input_affine=type_cls.input_affine,
            load_live=live.loader(name, cache.input_size if cache else None), missing=missing,
            why_no_cache=why_no_cache)
    return TeacherRouter(sources, ratio, cfg.train.seed, None if validation else augment,
                         dist.offline_max_shift, dist.offline_crops, skip_missing=validation, rank=rank)


def teacher_specs(router: TeacherRouter) -> Tuple[Dict[str, Tuple[FeatureSpec, ...]], Dict[str, str]]:
    """What each teacher provides (its cache's maps, else its live model's) and its primary map."""
    specs: Dict[str, Tuple[FeatureSpec, ...]] = {}
    primary: Dict[str, str] = {}
    for name, src in router.sources.items():
        if src.cache is not None:
            specs[name], primary[name] = src.cache.feature_specs, src.cache.primary_feature
        elif src.live is not None:
            teacher = src.live.teacher
            specs[name] = tuple(teacher.feature_specs())
            primary[name] = teacher.primary_feature or specs[name][-1].name
    return specs, primary


def teacher_outputs(teachers_cfg: Mapping[str, Mapping[str, Any]], router: TeacherRouter) -> Dict[str, Any]:
    """What each enabled teacher offers output distillation (``TeacherOutputs``): mask logits when its
    type ``can_segment`` (SAM family), its heads ``{name: (task, num_classes)}`` when it is a loaded
    teacher with head outputs (a vfmkd teacher; live only, so loaded before the losses are built)."""
    from vfmkd.distillation.pairing.output_rules import TeacherOutputs

    out: Dict[str, Any] = {}
    for name, entry in enabled_teachers(teachers_cfg).items():
        type_cls = TEACHERS.get(entry["type"])
        src = router.sources.get(name)
        live = src.live.teacher if src is not None and src.live is not None else None
        heads = {h: (str(t), int(k) if k is not None else 1) for h, (t, k) in getattr(live, "head_tasks", {}).items()}
        out[name] = TeacherOutputs(name, str(entry["type"]), bool(getattr(type_cls, "can_segment", False)), heads)
    return out
