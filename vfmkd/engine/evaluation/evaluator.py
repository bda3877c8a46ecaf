"""Evaluation on a held-out split: every head's metrics (the scorers of :mod:`vfmkd.tasks.scoring`), and the
fidelity of the distilled features (student-teacher cosine and MSE per teacher and level)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from tqdm import tqdm

from vfmkd.datasets.records import Batch
from vfmkd.distillation.cached import DistillBatch
from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.pairing.mask_grid import prompts_on_grid
from vfmkd.distillation.routing import TeacherRouter
from vfmkd.models.unified_model import StudentOutput, UnifiedModel
from vfmkd.tasks import get_task
from vfmkd.tasks.scoring.context import Scorer, ScoringContext
from vfmkd.tasks.scoring.detection_metrics import DetectionScorer
from vfmkd.tasks.scoring.panoptic_metrics import PANOPTIC


class FidelityMeter:
    """Held-out agreement of each feature term: mean cosine and MSE over valid cells, keyed
    ``<teacher>/<feature>@<level>`` (the loss entry's name is kept alongside)."""

    def __init__(self, distiller: Distiller) -> None:
        self.distiller = distiller
        self.sums: Dict[str, Tuple[float, float, float]] = {}

    def update(self, out: StudentOutput, batch: Batch, targets: Mapping[str, Any]) -> None:
        for name, (cos, mse, cells) in self.distiller.agreement(out, batch, targets).items():
            c0, m0, n0 = self.sums.get(name, (0.0, 0.0, 0.0))
            self.sums[name] = (c0 + cos, m0 + mse, n0 + cells)

    def result(self) -> Dict[str, Dict[str, Any]]:
        out = {}
        for name, (cos, mse, cells) in sorted(self.sums.items()):
            m = self.distiller.feature_losses[name]
            out[f"{m.teacher}/{m.teacher_feature}@{m.student_level}"] = {
                "loss": name, "cos": cos / max(cells, 1.0), "mse": mse / max(cells, 1.0), "cells": int(cells)}
        return out


def build_scorers(tasks: Mapping[str, str], box_names: Mapping[int, str], semantic_names: Optional[Mapping[int, str]],
                  conf: float = 0.001, iou: float = 0.7, max_det: int = 300, data_root: Optional[Any] = None,
                  split: Optional[str] = None, panoptic: Optional[bool] = None) -> Dict[str, Scorer]:
    """One scorer per head (``tasks``: head name -> task name; each task builds its own), plus
    ``"panoptic"`` (:class:`vfmkd.engine.evaluation.panoptic_quality.PanopticScorer`: PQ/SQ/RQ of the merged
    instance + semantic outputs) when the model has both heads and ``data_root``/``split`` hold panoptic
    annotations; ``panoptic`` True requires it (a missing head is a ConfigError naming it), False turns it off."""
    context = ScoringContext(box_names, semantic_names, conf, iou, max_det, teacher_prompts=prompts_on_grid,
                             data_root=data_root, split=split)
    resolved = {head: get_task(task) for head, task in tasks.items()}
    scorers: Dict[str, Scorer] = {head: task.build_scorer(head, context) for head, task in resolved.items()}
    from vfmkd.engine.evaluation.panoptic_quality import build_panoptic_scorer  # noqa: PLC0415 (its own module; imports the datasets)

    panoptic_scorer = build_panoptic_scorer(resolved, box_names, data_root, split, panoptic)
    if panoptic_scorer is not None:
        scorers[PANOPTIC] = panoptic_scorer
    return scorers


def primary_metric(result: Mapping[str, Any], tasks: Mapping[str, str]) -> Tuple[str, str, float, float, str]:
    """(head, metric key, its value, fitness, file tag e.g. ``mIoU0.4123``): PQ when the result has a panoptic
    score (a model with instance and semantic heads on panoptic labels), else the primary metric of the head
    whose task has the lowest ``best_rank`` (a segmentation head outranks detection); fitness orders
    checkpoints (the task's ``fitness``: ultralytics' 0.1 mAP50 + 0.9 mAP50-95 for detection, the metric
    itself otherwise; NaN -> -1)."""
    if isinstance(result.get(PANOPTIC), Mapping):  # instance + semantic merged: PQ is what the recipe is for
        pq = float(result[PANOPTIC]["PQ"])
        return PANOPTIC, "PQ", pq, pq if pq == pq else -1.0, f"PQ{pq:.4f}"
    resolved = {head: get_task(task) for head, task in tasks.items()}
    head = min(resolved, key=lambda h: resolved[h].best_rank)
    task, scores = resolved[head], result[head]
    metric, short = task.primary_metric
    value = float(scores[metric])
    fitness = task.fitness(scores)
    return head, metric, value, fitness if fitness == fitness else -1.0, f"{short}{value:.4f}"


def scalar_metrics(result: Mapping[str, Any]) -> Dict[str, float]:
    """The plain numbers of an :func:`evaluate` result, flattened for loggers: ``<head>/<metric>``,
    top-level numbers, ``cos_<teacher/feature@level>`` (per-class tables are left to test_results_<split>.txt)."""
    out: Dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif key == "fidelity":
            out.update({f"cos_{k}": float(v["cos"]) for k, v in value.items()})
        elif isinstance(value, Mapping):
            out.update({f"{key}/{k}": float(v) for k, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


@torch.no_grad()
def evaluate(
    model: UnifiedModel,
    loader,
    scorers: Mapping[str, Scorer],
    device: torch.device,
    progress: bool = True,
    distiller: Optional[Distiller] = None,
    router: Optional[TeacherRouter] = None,
    on_batch: Optional[Callable[[int, StudentOutput, Batch, Mapping[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Every head's metrics over ``loader`` (``result[head]``; a detection head's are also at the
    top level, as before segmentation heads existed) and, with ``distiller`` and ``router`` (whose
    batches carry cached val targets or go to the live teacher), ``fidelity`` per teacher and level.
    ``on_batch(step, out, batch, targets)`` sees each batch (visualisations). Scorers with
    ``wants_targets`` (promptable heads: alignment with the teacher's masks) get
    ``update(out, batch, targets)``; with such a scorer and a ``router`` the teachers' targets are
    fetched even without a distiller (every routed teacher). Scorers (and ``on_batch``'s owner)
    with ``bind`` are given the model first (a promptable head decodes prompts with its module)."""
    was_training = model.training
    model.eval()
    if distiller is not None:
        distiller.eval()
    fidelity = FidelityMeter(distiller) if distiller is not None and router is not None else None
    teachers = list(distiller.teachers_used(active_only=False)) if distiller is not None else []
    wants_targets = any(getattr(s, "wants_targets", False) for s in scorers.values())
    for owner in (*scorers.values(), getattr(on_batch, "__self__", None)):
        if hasattr(owner, "bind"):
            owner.bind(model)
    if router is not None:
        router.reset_counts()  # the sources of this evaluation only
    for step, item in enumerate(tqdm(loader, desc="eval", leave=False, disable=not progress)):
        item: Union[Batch, DistillBatch]
        batch, cached = (item.batch, item.cached) if isinstance(item, DistillBatch) else (item, {})
        batch = batch.to(device)
        out = model(batch.images)
        targets: Mapping[str, Any] = {}
        if router is not None and (fidelity is not None or wants_targets):
            targets = router.targets(step, batch, cached, teachers if distiller is not None else None)
            if fidelity is not None:
                fidelity.update(out, batch, targets)
        for scorer in scorers.values():
            if getattr(scorer, "wants_targets", False):
                scorer.update(out, batch, targets)
            else:
                scorer.update(out, batch)
        if on_batch is not None:
            on_batch(step, out, batch, targets)
    result: Dict[str, Any] = {}
    for head, scorer in scorers.items():
        result[head] = scorer.result()
        if isinstance(scorer, DetectionScorer) and "mAP50" not in result:
            result.update(result[head])
    if fidelity is not None:
        result["fidelity"] = fidelity.result()
        if router is not None:
            result["fidelity_sources"] = router.summary()
    model.train(was_training)
    if distiller is not None:
        distiller.train(was_training)
    return result
