"""Builders: the only code that reads config dicts. Each unpacks one section into plain keyword
arguments of a component (detectron2's style: the components never see cfg)."""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

import vfmkd.teachers  # noqa: F401  (registers the built-in teachers)
from vfmkd.core.config import DataConfig, ExperimentConfig, ModelConfig, component_kwargs, resolve_path, teacher_kwargs
from vfmkd.core.device import AUTO
from vfmkd.core.errors import ConfigError, did_you_mean
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS, LOSSES, TEACHERS
from vfmkd.datasets import DetectionDataset, GeometricAugment
from vfmkd.datasets.feature_cache import dataset_cli_args, rebuild_command
from vfmkd.distillation.distiller import FEATURE_LOG_PREFIX, RESERVED_LOSS_KEYS, Distiller, LossTerm
from vfmkd.distillation.offline import CacheMissingError, OfflineTeacher, open_offline_teacher
from vfmkd.distillation.online import OnlineTeacher
from vfmkd.distillation.output_pairs import check_mask_sources
from vfmkd.distillation.resolution import LOG_NAME as RESOLUTION_LOG_NAME
from vfmkd.distillation.resolution import build_resolution_term
from vfmkd.distillation.routing import TeacherRouter, TeacherSource
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.teachers.settings import teacher_keys
from vfmkd.utils.logging import get_logger


def build_augment(data: DataConfig) -> Optional[GeometricAugment]:
    a = data.augment
    augment = GeometricAugment(fliplr=a.fliplr, scale=a.scale, translate=a.translate, degrees=a.degrees)
    return augment if augment.enabled else None


def head_tasks(model: Union[ModelConfig, Mapping[str, Any]]) -> Dict[str, str]:
    """Head name -> its task (detection | instance | semantic | binary), from the registry."""
    heads = model.heads if isinstance(model, ModelConfig) else model.get("heads", {})
    return {name: str(getattr(HEADS.get(entry["type"]), "task", "detection")) for name, entry in heads.items()}


BOX_TASKS = ("detection", "instance")  # heads whose num_classes is the box label class count


def box_classes_key(heads: Mapping[str, Mapping[str, Any]]) -> str:
    """The setting(s) behind the box class count: ``model.heads.<name>.num_classes`` of each box head."""
    names = [n for n, task in head_tasks({"heads": heads}).items() if task in BOX_TASKS]
    return " and ".join(f"model.heads.{n}.num_classes" for n in names) or "model.heads.<box head>.num_classes"


def check_head_classes(heads: Mapping[str, Mapping[str, Any]], dataset: DetectionDataset) -> None:
    """A semantic head needs a logit per class of the dataset's table (else the loss indexes past its
    logits); more logits than classes train nothing and are only warned about."""
    for name, task in head_tasks({"heads": heads}).items():
        want, have = dataset.semantic_num_classes, heads[name].get("num_classes")
        if task != "semantic" or want is None or have is None:
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
                  heads: Optional[Mapping[str, Mapping[str, Any]]] = None) -> DetectionDataset:
    """The split with the labels the model's heads train on (``tasks``: head tasks; a promptable
    head reads instance masks: its points are drawn inside them and it is scored against them).
    With ``heads`` (``model.heads``) the class counts are checked against the dataset as it loads,
    and a class id beyond them names the head's key."""
    binary = "binary" in tasks
    if binary and not data.binary_classes:
        raise ConfigError("a binary_head needs data.binary_classes: the semantic class names that are foreground "
                          "(e.g. data.binary_classes=[person])")
    dataset = DetectionDataset(str(resolve_path(data.root)), split, data.img_size, data.limit, num_classes,
                               augment=augment, seed=seed, instances=bool({"instance", "promptable"} & set(tasks)),
                               semantic="semantic" in tasks,
                               binary_classes=tuple(data.binary_classes) if binary else (),
                               classes_key=box_classes_key(heads or {}))
    if heads is not None:
        check_head_classes(heads, dataset)
    return dataset


INIT_KEYS = ("from", "parts", "strict")


def build_model(model: Union[ModelConfig, Mapping[str, Any]], initialise: bool = False) -> UnifiedModel:
    """The student from the ``model`` section (its backbone, neck and head entries; DSRL's input scale).
    ``initialise``: load ``model.init`` (a training run that does not resume; tools that load a
    checkpoint of their own skip it); its report is kept in ``init_report``."""
    student = UnifiedModel.from_config(model)
    init = dict((model.init if isinstance(model, ModelConfig) else model.get("init")) or {})
    unknown = [k for k in init if k not in INIT_KEYS]
    if unknown:
        raise ConfigError(f"model.init: unknown key '{unknown[0]}'.{did_you_mean(unknown[0], INIT_KEYS)} "
                          f"Keys: from (the file), parts (backbone/neck/heads), strict.")
    if initialise and init.get("from"):
        from vfmkd.models.pretrained import initialise_student

        student.init_report = initialise_student(student, str(resolve_path(init["from"])), init.get("parts"),
                                                 bool(init.get("strict", False)))
    return student


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
    return open_offline_teacher(name, path, fingerprint, teacher_cls.primary_feature, rebuild, entry,
                                label_dir=label_dir)


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


def _closest_stride_level(levels: Mapping[str, FeatureSpec], stride: int) -> str:
    return min(levels.values(), key=lambda s: abs(math.log2(s.stride) - math.log2(stride))).name


def teacher_outputs(teachers_cfg: Mapping[str, Mapping[str, Any]], router: TeacherRouter) -> Dict[str, Any]:
    """What each enabled teacher offers output distillation (``TeacherOutputs``): mask logits when its
    type ``can_segment`` (SAM family), its heads ``{name: (task, num_classes)}`` when it is a loaded
    teacher with head outputs (a vfmkd teacher; live only, so loaded before the losses are built)."""
    from vfmkd.distillation.output_rules import TeacherOutputs

    out: Dict[str, Any] = {}
    for name, entry in enabled_teachers(teachers_cfg).items():
        type_cls = TEACHERS.get(entry["type"])
        src = router.sources.get(name)
        live = src.live.teacher if src is not None and src.live is not None else None
        heads = {h: (str(t), int(k) if k is not None else 1) for h, (t, k) in getattr(live, "head_tasks", {}).items()}
        out[name] = TeacherOutputs(name, str(entry["type"]), bool(getattr(type_cls, "can_segment", False)), heads)
    return out


def output_class_channels(data_root: str, binary_classes: Sequence[str] = ()) -> Dict[str, List[int]]:
    """Detection class id -> logit channel of a ``semantic`` head (its contiguous semantic index,
    classes matched by name; -1 when the detection class has no semantic class) and of a ``binary``
    head (0 for the classes named in ``data.binary_classes``, else -1), for output distillation of
    box-prompted teacher masks. A table whose file is absent is left out."""
    from pathlib import Path

    from vfmkd.core.errors import DatasetError
    from vfmkd.datasets.masks import DETECTION_CONFIG, SemanticClassTable, read_names

    root = resolve_path(data_root)
    det_file = Path(root) / DETECTION_CONFIG
    if not det_file.is_file():
        return {}
    det = read_names(det_file, "names")
    size = max(det) + 1
    tables: Dict[str, List[int]] = {}
    try:
        semantic = SemanticClassTable.load(Path(root))
    except DatasetError:  # a dataset without semantic labels: no semantic/binary table
        return tables
    position = {n: k for k, n in enumerate(semantic.names) if k > 0}
    tables["semantic"] = [position.get(det.get(c, ""), -1) for c in range(size)]
    wanted = set(binary_classes)
    tables["binary"] = [0 if det.get(c) in wanted else -1 for c in range(size)]
    return tables


def _output_head(where: str, kind_name: str, head: Optional[str], teacher: Any, model: UnifiedModel) -> str:
    """The student head an output term reads: ``head:``, else the only head whose task the teacher
    serves for this loss."""
    from vfmkd.distillation.output_rules import HEAD_RULES, MASK_RULES, TEACHER_TASKS

    tasks = {n: str(getattr(h, "task", "detection")) for n, h in model.heads.items()}
    if head is not None:
        if head not in model.heads:
            raise ConfigError(f"{where}: the model has no head '{head}' (heads: {list(model.heads)})")
        return head
    served = set(MASK_RULES[kind_name]) if teacher.can_segment else set()
    served |= {task for task in HEAD_RULES[kind_name]
               if any(t in TEACHER_TASKS[task] for t, _ in teacher.heads.values())}
    fits = [n for n, task in tasks.items() if task in served]
    if not fits:  # the teacher serves none: the head the loss could read at all, so the resolver says why
        fits = [n for n, task in tasks.items() if task in MASK_RULES[kind_name] + HEAD_RULES[kind_name]]
        fits = fits if len(fits) == 1 else list(model.heads) if len(model.heads) == 1 else []
    if len(fits) == 1:
        return fits[0]
    choices = ("candidates: " + ", ".join(fits) if fits
               else "heads: " + ", ".join(f"{n} ({t})" for n, t in tasks.items()))
    raise ConfigError(f"{where}: set 'head:' to the student head {kind_name} distils ({choices})")


def build_loss_terms(losses_cfg: Mapping[str, Mapping[str, Any]], model: UnifiedModel,
                     specs: Mapping[str, Sequence[FeatureSpec]], primary: Mapping[str, str],
                     teachers: Optional[Mapping[str, Any]] = None,
                     class_channels: Optional[Mapping[str, Sequence[int]]] = None) -> List[LossTerm]:
    """One :class:`LossTerm` per ``distillation.losses`` entry; feature losses get their channel
    sizes, teacher map and student level resolved here (a loss never reads config).

    Output losses (``kl_divergence``, ``cls_distill``, ``mask_distill``) name ``teacher:`` and
    ``head:`` (default: the only head the teacher serves; ``teacher_head:`` picks a vfmkd teacher's
    head) and get their pairing (:mod:`vfmkd.distillation.output_rules`) from ``teachers``
    (:func:`teacher_outputs`) and, for semantic/binary heads taught by masks, ``class_channels``
    (:func:`output_class_channels`). ``embedding_distill`` / ``prompt_distill`` train a promptable
    (``sam_decoder``) head (:mod:`vfmkd.distillation.prompt_pairs`)."""
    from vfmkd.distillation.output_pairs import OutputPairing
    from vfmkd.distillation.output_rules import TeacherOutputs, resolve_output_term
    from vfmkd.distillation.prompt_pairs import PROMPT_LOSSES, build_prompt_term

    levels = {s.name: s for s in model.backbone.feature_specs()}
    offers: Mapping[str, Any] = teachers if teachers is not None else {n: TeacherOutputs(n, "?") for n in specs}
    terms = []
    for name, entry in losses_cfg.items():
        where = f"distillation.losses.{name}"
        kind_name = entry["type"]
        kwargs = component_kwargs(dict(entry), reserved=RESERVED_LOSS_KEYS)
        kind = getattr(LOSSES.get(kind_name), "kind", "feature")
        head = ""
        pairing = None
        if kind == "task":
            head = kwargs.pop("head", "detection")
            if head not in model.heads:
                raise ConfigError(f"{where}: the model has no head '{head}' (heads: {list(model.heads)})")
            module = LOSSES.build(kind_name, where=where, head=model.heads[head], **kwargs)
            default_log = "loss_det" if head == "detection" else f"loss_{head}"
        elif kind == "feature":
            teacher = kwargs.get("teacher")
            if teacher not in specs:
                raise ConfigError(
                    f"{where}: teacher '{teacher}' is not an enabled teacher of this experiment (enabled: "
                    f"{sorted(specs)}); set 'teacher:' to one of them or enable it under teachers.")
            t_specs = {s.name: s for s in specs[teacher]}
            t_name = kwargs.get("teacher_feature") or primary[teacher]
            if t_name not in t_specs:
                raise ConfigError(f"{where}: teacher '{teacher}' provides {sorted(t_specs)}, not '{t_name}'")
            level = kwargs.get("student_level") or _closest_stride_level(levels, t_specs[t_name].stride)
            if level not in levels:
                raise ConfigError(f"{where}: the student backbone has levels {sorted(levels)}, not '{level}'")
            kwargs.update(teacher_feature=t_name, student_level=level, student_channels=levels[level].channels,
                          teacher_channels=t_specs[t_name].channels)
            module = LOSSES.build(kind_name, where=where, **kwargs)
            default_log = f"{FEATURE_LOG_PREFIX}{teacher}"
        elif kind_name in ("kl_divergence", "cls_distill", "mask_distill"):
            teacher = kwargs.get("teacher")
            if teacher not in offers:
                raise ConfigError(
                    f"{where}: {kind_name} distils a teacher's outputs; 'teacher: {teacher}' is not an enabled teacher "
                    f"of this experiment (enabled: {sorted(offers)}); set 'teacher:' to one of them.")
            head = _output_head(where, kind_name, kwargs.pop("head", None), offers[teacher], model)
            head_module = model.heads[head]
            task = str(getattr(head_module, "task", "detection"))
            rule = resolve_output_term(kind_name, where, head, task, int(getattr(head_module, "num_classes", 1)),
                                       offers[teacher], offers, kwargs.pop("teacher_head", None))
            channels = None
            if rule.source == "masks" and task in ("semantic", "binary"):
                channels = (class_channels or {}).get(task)
                if channels is None:
                    raise ConfigError(f"{where}: {kind_name} on the {task} head '{head}' from {teacher}'s box masks "
                                      "needs the dataset's class tables (object_detection and semantic_segmentation "
                                      "config.yaml)")
                if task == "binary" and not any(c >= 0 for c in channels):
                    raise ConfigError(f"{where}: none of data.binary_classes is a detection class, so {teacher} is "
                                      "never prompted for the binary foreground; name detection classes (e.g. "
                                      "[person])")
                if task == "semantic":
                    k = int(getattr(head_module, "num_classes", 0))
                    channels = [c if c < k else -1 for c in channels]
            module = LOSSES.build(kind_name, where=where, **kwargs)
            pairing = OutputPairing(rule, head_module, channels, getattr(module, "mode", "sigmoid"))
            default_log = module.log_name
        elif kind_name in PROMPT_LOSSES:  # the promptable (sam_decoder) head: vfmkd/distillation/prompt_pairs.py
            head, module, pairing = build_prompt_term(kind_name, where, kwargs, model, offers, specs, primary)
            default_log = module.log_name
        else:
            raise ConfigError(
                f"{where}: '{kind_name}' is an output loss the distiller has no pairing for (the output losses it "
                "pairs: kl_divergence, cls_distill, mask_distill, embedding_distill, prompt_distill); use one of them "
                f"or a feature loss.")
        terms.append(LossTerm(name, kind, float(entry.get("weight", 1.0)), str(entry.get("log_as") or default_log),
                              module, head, pairing))
    return terms


def build_distiller(cfg: ExperimentConfig, model: UnifiedModel, router: TeacherRouter,
                    live: Optional[LiveTeachers] = None) -> Distiller:
    """The losses of ``cfg.distillation`` for ``model``, built after ``router.load_live_models()``
    (a vfmkd teacher's heads are read from its loaded model). Teachers whose box-prompted masks an
    output term reads are switched to mask passes (``live``), and their caches must hold masks."""
    dist = cfg.distillation
    specs, primary = teacher_specs(router)
    terms = build_loss_terms(dist.losses, model, specs, primary, teachers=teacher_outputs(cfg.teachers, router),
                             class_channels=output_class_channels(cfg.data.root, cfg.data.binary_classes))
    dsrl = build_resolution_term(model, cfg.model, cfg.data.img_size)  # model.resolution_distill (DSRL)
    if dsrl is not None:
        terms.append(LossTerm(dsrl[0], "task", 1.0, RESOLUTION_LOG_NAME, dsrl[1], dsrl[2]))
    distiller = Distiller(terms, alpha=dist.alpha, beta=dist.beta, gamma=dist.gamma)
    needing = distiller.teachers_needing_masks()
    check_mask_sources(distiller, router)
    if live is not None:
        live.with_masks(needing)
    for name in needing:
        src = router.sources.get(name)
        if src is not None and src.live is not None:
            src.live.masks = True
    return distiller

