"""``tools/test.py``'s work: load a trained checkpoint and evaluate it on a split (mAP and fidelity)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from vfmkd.cache.format import rebuild_command
from vfmkd.core.config import experiment_record
from vfmkd.core.device import resolve_device
from vfmkd.core.errors import CacheMismatchError, CheckpointError, ConfigError
from vfmkd.distillation.cached import CachedTargetsDataset
from vfmkd.engine.builders import (
    LiveTeachers,
    build_dataset,
    build_distiller,
    build_model,
    build_router,
    class_names,
    detection_classes,
    enabled_teachers,
    head_tasks,
)
from vfmkd.engine.evaluation.evaluator import build_scorers, evaluate
from vfmkd.engine.evaluation.results_text import write_test_results
from vfmkd.engine.pictures.epoch_vis import EpochVisualizer, semantic_class_names
from vfmkd.engine.pictures.vis_canvas import visualization_path
from vfmkd.engine.training.loaders import build_loader, worker_count
from vfmkd.models.input_scale import check_model_input
from vfmkd.tasks.scoring.panoptic_metrics import PANOPTIC
from vfmkd.utils.checkpoint import load_checkpoint
from vfmkd.utils.logging import get_logger


def _load(module: torch.nn.Module, state: Mapping[str, Any], what: str, checkpoint: Path, config: str) -> None:
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{checkpoint}: the {what} holds NaN/inf values ({', '.join(bad[:3])}); evaluate an "
                              f"earlier checkpoint of the run")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint} does not fit the {what} of {config} (was it trained with another backbone, variant, "
            f"num_classes or losses? pass the run's own config.yaml): {str(exc).splitlines()[0]}") from exc


FIDELITY_SOURCES = ("cache", "live", "off")


def fidelity_router(exp: Any, dataset: Any, live: LiveTeachers, fidelity: str) -> Optional[Any]:
    """The router that scores held-out fidelity, or None (skipped, with one line saying how to get it).
    ``cache``: only when every enabled teacher has a usable cache of the split (the task metrics never
    wait for, or fail on, a teacher); ``live``: the live teacher stands in where a cache is missing."""
    if fidelity not in FIDELITY_SOURCES:
        raise ConfigError(f"--fidelity {fidelity}: choose one of {', '.join(FIDELITY_SOURCES)}")
    how = "pass --fidelity live to run the live teacher over the split (needs its weights; slow on CPU)"
    try:
        router = build_router(exp, dataset, live, validation=True)
    except (CacheMismatchError, CheckpointError, ConfigError) as exc:
        if fidelity == "live":
            raise
        get_logger().warning("held-out fidelity skipped: %s\n(rebuild that cache, or %s)", exc, how)
        return None
    uncached = [n for n in router.sources if router.live_reason(n)]
    if uncached and fidelity != "live":
        teachers = enabled_teachers(exp.teachers)
        fixes = [
            rebuild_command(
                teachers[n]["type"],
                exp.data.dataset,
                dataset.split,
                str(teachers[n]["feature_path"]),
                teacher_config=teachers[n],
            )
            for n in uncached
            if teachers[n].get("feature_path") and teachers[n].get("offline", True)
        ]
        live_only = [n for n in uncached if not (teachers[n].get("feature_path") and teachers[n].get("offline", True))]
        # a live-only teacher has no cache to write: --fidelity live is its only way
        said = ([f"cache it ({'; '.join(fixes)})"] if fixes else []) + [how]
        get_logger().info("held-out fidelity skipped: no %s cache of teacher(s) %s%s; %s", dataset.split,
                          ", ".join(uncached),
                          f" ({', '.join(f'teachers.{n}' for n in live_only)}: live only, offline: false)"
                          if live_only else "", ", or ".join(said))
        return None
    return router


def test_results_path(out_dir: Path, split: str) -> Path:
    """``out_dir/test_results_<split>.txt``: one per split, as ``test_metrics_<split>.json``, so testing
    another split does not replace this one's summary."""
    return Path(out_dir) / f"test_results_{split}.txt"


def test_checkpoint(cfg: Dict[str, Any], checkpoint: Path, split: str, config_name: str,
                    progress: bool = True, out_dir: Optional[Path] = None, fidelity: str = "cache") -> Dict[str, Any]:
    """Every head's metrics (mAP, mask mAP, mIoU, Dice, ...) of the checkpoint's student on ``split``
    and, when the run distilled features (and ``eval.fidelity``), the held-out cosine/MSE per teacher
    and level against the split's cache (``fidelity`` "cache", the default: skipped, with one line,
    when a teacher has none) or, with "live", the live teacher where no cache exists ("off": none). With ``out_dir``,
    the first batch is drawn into ``out_dir/visualizations/test_sample_000.png`` (+ ``_pca``; a model
    with instance and semantic heads also ``test_panoptic_000.png``, its merged panoptic output) and
    every metric (PQ/SQ/RQ under ``panoptic``) is written to ``out_dir/test_results_<split>.txt``."""
    exp = experiment_record(cfg)
    state = load_checkpoint(checkpoint)
    if "model" not in state:
        raise CheckpointError(f"{checkpoint} is not a vfmkd training checkpoint (no 'model' entry); pass "
                              "checkpoints/best.pt of a run")
    device = resolve_device(exp.train.device, "train.device")
    model = build_model(exp.model)  # the inference path: full resolution, or model.infer_scale
    check_model_input(model, exp.data.img_size, "model.infer_scale" if exp.model.infer_scale else "tools/test.py",
                      "data.img_size")
    _load(model, state["model"], "model", checkpoint, config_name)
    model.to(device)
    num_classes = detection_classes(exp.model.heads)
    tasks = head_tasks(exp.model)
    dataset = build_dataset(exp.data, split, num_classes, tasks=tasks.values(), heads=exp.model.heads)
    distiller = router = None
    loader_set: Any = dataset
    wants_fidelity = fidelity != "off" and exp.eval.fidelity and bool(exp.distillation.losses)
    if wants_fidelity and "distiller" in state:
        live = LiveTeachers(exp.teachers, device)
        router = fidelity_router(exp, dataset, live, fidelity)
    elif wants_fidelity:
        get_logger().warning("%s holds no distillation adapters: no fidelity numbers", checkpoint)
    if router is not None:
        router.load_live_models()
        distiller = build_distiller(exp, model, router, live).to(device)
        _load(distiller, state["distiller"], "distillation adapters", checkpoint, config_name)
        distiller.load_teacher_stats(state.get("teacher_stats", {}))  # the standardisation the run trained with
        if not distiller.teachers_used(active_only=False):
            distiller = router = None
        else:
            caches = {n: s.cache for n, s in router.sources.items() if s.cache is not None}
            loader_set = CachedTargetsDataset(dataset, caches, {n: s.missing for n, s in router.sources.items()})
    loader = build_loader(loader_set, exp.eval.batch_size, worker_count(exp.data.num_workers), False, exp.train.seed)
    names, semantic_names = class_names(exp.data.root, num_classes, dataset.names), semantic_class_names(dataset)
    e = exp.eval
    vis = EpochVisualizer(out_dir, "test_sample", 0, tasks, distiller, names, semantic_names,
                          e.vis_images) if out_dir else None
    scorers = build_scorers(tasks, names, semantic_names, e.conf, e.iou, e.max_det, data_root=dataset.root, split=split)
    if out_dir is not None and PANOPTIC in scorers:  # instance + semantic heads: the merged panoptic picture
        scorers[PANOPTIC].draw_to = visualization_path(out_dir, "test_panoptic", 0)
        scorers[PANOPTIC].draw_images = e.vis_images
    metrics = evaluate(model, loader, scorers, device,
                       progress=progress, distiller=distiller, router=router, on_batch=vis.on_batch if vis else None)
    metrics.update(checkpoint=str(checkpoint), split=split, epoch=state.get("epoch"))
    if out_dir is not None:
        header = {"checkpoint": str(checkpoint), "split": split, "epoch": state.get("epoch"), "config": config_name}
        write_test_results(test_results_path(out_dir, split), {k: v for k, v in metrics.items() if k not in header},
                           header)
    return metrics
