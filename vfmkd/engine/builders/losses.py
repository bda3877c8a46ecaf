"""Builders of the losses: ``distillation.losses`` -> :class:`LossTerm` list -> :class:`Distiller`."""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Mapping, Optional, Sequence

from vfmkd.core.config import component_kwargs, resolve_path
from vfmkd.core.config_schema import ExperimentConfig
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import LOSSES, TASKS
from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.losses.task import DEFAULT_HEAD
from vfmkd.distillation.pairing.output_pairs import check_mask_sources
from vfmkd.distillation.pairing.output_rules import TeacherOutputs
from vfmkd.distillation.resolution import with_resolution_terms
from vfmkd.distillation.routing import TeacherRouter
from vfmkd.distillation.terms import RESERVED_LOSS_KEYS, LossEntry, LossTerm, TermContext, missing_hook_error
from vfmkd.engine.builders.teachers import LiveTeachers, teacher_outputs, teacher_specs
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.utils.logging import get_logger


def output_class_channels(data_root: str, binary_classes: Sequence[str] = ()) -> Dict[str, List[int]]:
    """Detection class id -> logit channel of a ``semantic`` head (its contiguous semantic index,
    classes matched by name; -1 when the detection class has no semantic class) and of a ``binary``
    head (0 for the classes named in ``data.binary_classes``, else -1), for output distillation of
    box-prompted teacher masks. A table whose file is absent is left out."""
    from pathlib import Path

    from vfmkd.core.errors import DatasetError
    from vfmkd.datasets.masks import DETECTION_CONFIG, SemanticClassTable, read_names
    from vfmkd.tasks import get_task

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
    for name in TASKS.names():  # every task whose classes are the semantic table's (a query panoptic head's too)
        if get_task(name).semantic_classes:
            tables[name] = tables["semantic"]
    wanted = set(binary_classes)
    tables["binary"] = [0 if det.get(c) in wanted else -1 for c in range(size)]
    return tables


def build_loss_terms(losses_cfg: Mapping[str, Mapping[str, Any]], model: UnifiedModel,
                     specs: Mapping[str, Sequence[FeatureSpec]], primary: Mapping[str, str],
                     teachers: Optional[Mapping[str, Any]] = None,
                     class_channels: Optional[Mapping[str, Sequence[int]]] = None,
                     temperature: Optional[float] = None) -> List[LossTerm]:
    """One :class:`LossTerm` per ``distillation.losses`` entry, built by its loss class's
    ``build_term(entry, context)`` hook (:mod:`vfmkd.distillation.terms`): feature losses resolve
    their teacher map, student level and channel sizes, task losses their head, output losses their
    head and pairing (:mod:`vfmkd.distillation.pairing`) from ``teachers`` (:func:`teacher_outputs`)
    and, for semantic/binary heads taught by masks, ``class_channels`` (:func:`output_class_channels`).
    ``temperature`` (``distillation.temperature``): the default of every entry whose loss takes one."""
    losses_cfg = with_run_temperature(with_own_head_losses(losses_cfg, model.heads), temperature)
    offers: Mapping[str, Any] = teachers if teachers is not None else {n: TeacherOutputs(n, "?") for n in specs}
    context = TermContext(model, specs, primary, offers, class_channels or {})
    terms = []
    for name, entry in losses_cfg.items():
        loss = LossEntry(name, entry["type"], float(entry.get("weight", 1.0)), str(entry.get("log_as") or ""),
                         component_kwargs(dict(entry), reserved=RESERVED_LOSS_KEYS))
        hook = getattr(LOSSES.get(loss.type), "build_term", None)
        if hook is None:
            raise missing_hook_error(loss.where, loss.type, LOSSES.get(loss.type))
        built = hook(loss, context)  # a multi-level feature entry gives one term per pair
        terms.extend(built if isinstance(built, list) else [built])
    return terms


def with_own_head_losses(losses_cfg: Mapping[str, Mapping[str, Any]],
                         heads: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    """A head that trains with its model's own criterion (its class's ``own_loss``: the ultralytics heads) gets
    the entry ``{type: <own_loss>, head: <head>}`` (named after the head) when no task loss reads it, logged; a
    task loss of another type on it is refused (another criterion does not read its outputs)."""
    out = dict(losses_cfg)
    for head_name, head in heads.items():
        own = getattr(head, "own_loss", "")
        if not own:
            continue
        reading = [n for n, e in losses_cfg.items()
                   if getattr(LOSSES.get(e["type"]), "kind", "") == "task" and e.get("head", DEFAULT_HEAD) == head_name]
        wrong = [n for n in reading if losses_cfg[n]["type"] != own]
        if wrong:
            raise ConfigError(f"distillation.losses.{wrong[0]}: model.heads.{head_name} ({type(head).__name__}) trains "
                              f"with its model's own criterion: set type: {own} (got {losses_cfg[wrong[0]]['type']})")
        if not reading:
            name = head_name if head_name not in out else f"{head_name}_{own}"
            out[name] = {"type": own, "head": head_name}
            get_logger().info("distillation.losses.%s: {type: %s, head: %s} (implied: the head trains with its "
                              "model's own criterion; distillation.alpha: 0 turns task losses off)",
                              name, own, head_name)
    return out


def with_run_temperature(losses_cfg: Mapping[str, Mapping[str, Any]],
                         temperature: Optional[float]) -> Mapping[str, Mapping[str, Any]]:
    """``distillation.temperature`` set on every entry whose loss takes a ``temperature`` and that sets none
    of its own (logged once, with the entries that keep theirs)."""
    if temperature is None:
        return losses_cfg
    if not temperature > 0:
        raise ConfigError(f"distillation.temperature must be > 0 (or null), got {temperature}")
    takes = {n for n, e in losses_cfg.items()
             if "temperature" in inspect.signature(LOSSES.get(e["type"]).__init__).parameters}
    own = sorted(n for n in takes if "temperature" in losses_cfg[n])
    given = sorted(takes - set(own))
    get_logger().info("distillation.temperature=%g for %s%s", temperature, ", ".join(given) or "no loss entry",
                      "; their own temperature: " + ", ".join(f"{n} (T={losses_cfg[n]['temperature']:g})" for n in own)
                      if own else "")
    return {n: {**e, "temperature": temperature} if n in given else e for n, e in losses_cfg.items()}


def build_distiller(cfg: ExperimentConfig, model: UnifiedModel, router: TeacherRouter,
                    live: Optional[LiveTeachers] = None) -> Distiller:
    """The losses of ``cfg.distillation`` for ``model``, built after ``router.load_live_models()``
    (a vfmkd teacher's heads are read from its loaded model). Teachers whose box-prompted masks an
    output term reads are switched to mask passes (``live``), and their caches must hold masks."""
    dist = cfg.distillation
    specs, primary = teacher_specs(router)
    terms = build_loss_terms(dist.losses, model, specs, primary, teachers=teacher_outputs(cfg.teachers, router),
                             class_channels=output_class_channels(cfg.data.root, cfg.data.binary_classes),
                             temperature=dist.temperature)
    terms = with_resolution_terms(terms, model, cfg.model, cfg.data.img_size)  # model.resolution_distill (DSRL)
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
