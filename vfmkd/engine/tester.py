"""``tools/test.py``'s work: load a trained checkpoint and evaluate it on a split (mAP and fidelity)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping

import torch

from vfmkd.core.config import experiment_record
from vfmkd.core.errors import CheckpointError
from vfmkd.distillation.cached import CachedTargetsDataset
from vfmkd.engine.builders import LiveTeachers, build_dataset, build_distiller, build_model, build_router
from vfmkd.engine.evaluator import evaluate
from vfmkd.engine.setup import build_loader, class_names, detection_classes, select_device, worker_count
from vfmkd.utils.checkpoint import load_checkpoint
from vfmkd.utils.logging import get_logger


def _load(module: torch.nn.Module, state: Mapping[str, Any], what: str, checkpoint: Path, config: str) -> None:
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{checkpoint}: the {what} holds NaN/inf values ({', '.join(bad[:3])}); evaluate an earlier "
                              f"checkpoint of the run")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint} does not fit the {what} of {config} (was it trained with another backbone, variant, "
            f"num_classes or losses? pass the run's own config.yaml): {str(exc).splitlines()[0]}") from exc


def test_checkpoint(cfg: Dict[str, Any], checkpoint: Path, split: str, config_name: str,
                    progress: bool = True) -> Dict[str, Any]:
    """mAP of the checkpoint's student on ``split`` and, when the run distilled features (and
    ``eval.fidelity``), the held-out cosine/MSE per teacher and level against the split's cache
    or, where none exists, the live teacher."""
    exp = experiment_record(cfg)
    state = load_checkpoint(checkpoint)
    if "model" not in state:
        raise CheckpointError(f"{checkpoint} is not a vfmkd training checkpoint (no 'model' entry); pass checkpoints/best.pt of a run")
    device = select_device(exp.train.device)
    model = build_model(exp.model)
    _load(model, state["model"], "model", checkpoint, config_name)
    model.to(device)
    num_classes = detection_classes(exp.model.heads)
    dataset = build_dataset(exp.data, split, num_classes)
    distiller = router = None
    loader_set: Any = dataset
    wants_fidelity = exp.eval.fidelity and bool(exp.distillation.losses)
    if wants_fidelity and "distiller" in state:
        router = build_router(exp, dataset, LiveTeachers(exp.teachers, device), validation=True)
        router.load_live_models()
        distiller = build_distiller(exp.distillation, model, router).to(device)
        _load(distiller, state["distiller"], "distillation adapters", checkpoint, config_name)
        distiller.load_teacher_stats(state.get("teacher_stats", {}))  # the standardisation the run trained with
        if not distiller.teachers_used(active_only=False):
            distiller = router = None
        else:
            caches = {n: s.cache for n, s in router.sources.items() if s.cache is not None}
            loader_set = CachedTargetsDataset(dataset, caches, {n: s.missing for n, s in router.sources.items()})
    elif wants_fidelity:
        get_logger().warning("%s holds no distillation adapters: no fidelity numbers", checkpoint)
    loader = build_loader(loader_set, exp.eval.batch_size, worker_count(exp.data.num_workers), False, exp.train.seed)
    metrics = evaluate(model, loader, class_names(exp.data.root, num_classes), device, exp.eval.conf, exp.eval.iou,
                       exp.eval.max_det, progress=progress, distiller=distiller, router=router)
    metrics.update(checkpoint=str(checkpoint), split=split, epoch=state.get("epoch"))
    return metrics
