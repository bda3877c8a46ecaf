"""Builders of the losses: ``distillation.losses`` -> :class:`LossTerm` list -> :class:`Distiller`."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from vfmkd.core.config import component_kwargs, resolve_path
from vfmkd.core.config_schema import ExperimentConfig
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.distiller import FEATURE_LOG_PREFIX, RESERVED_LOSS_KEYS, Distiller, LossTerm
from vfmkd.distillation.pairing.output_pairs import check_mask_sources
from vfmkd.distillation.resolution import LOG_NAME as RESOLUTION_LOG_NAME
from vfmkd.distillation.resolution import build_resolution_term
from vfmkd.distillation.routing import TeacherRouter
from vfmkd.engine.builders.teachers import LiveTeachers, _closest_stride_level, teacher_outputs, teacher_specs
from vfmkd.models.unified_model import UnifiedModel


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
    from vfmkd.distillation.pairing.output_rules import HEAD_RULES, MASK_RULES, TEACHER_TASKS

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
    head) and get their pairing (:mod:`vfmkd.distillation.pairing.output_rules`) from ``teachers``
    (:func:`teacher_outputs`) and, for semantic/binary heads taught by masks, ``class_channels``
    (:func:`output_class_channels`). ``embedding_distill`` / ``prompt_distill`` train a promptable
    (``sam_decoder``) head (:mod:`vfmkd.distillation.pairing.prompt_pairs`)."""
    from vfmkd.distillation.pairing.output_pairs import OutputPairing
    from vfmkd.distillation.pairing.output_rules import TeacherOutputs, resolve_output_term
    from vfmkd.distillation.pairing.prompt_pairs import PROMPT_LOSSES, build_prompt_term

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
