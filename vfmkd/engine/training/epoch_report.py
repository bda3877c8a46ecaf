"""What a training run reports: its start line, per epoch the train.log lines (and a warning for
images no feature loss could teach), and the content of metrics.json.

Pure functions of the run's history (a list of epoch records as the Trainer builds them), so the
Trainer keeps the loop and this module keeps the wording and the file's schema.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from vfmkd.engine.evaluation.evaluator import primary_metric


def log_epoch(log: logging.Logger, record: Dict[str, Any], epochs: Optional[int], tasks: Any,
              teacher_batches: Mapping[str, Mapping[str, int]]) -> None:
    """One line per epoch (train losses, the val metric that picks best.pt, held-out cosines), then
    the per-teacher count of cached vs live batches so far."""
    summary = "  ".join(f"{k}={v:.4f}" for k, v in record["train"].items() if not k.startswith("loss_det_"))
    val = record.get("val")
    val_text = ""
    if val:
        head, metric, value = primary_metric(val, tasks)[:3]
        val_text = f"  val {head} {metric}={value:.4f}" + (
            f" mAP50={val['mAP50']:.4f} mAP50-95={val['mAP50-95']:.4f}"
            if "mAP50" in val and metric != "mAP50-95"
            else ""
        )
    if val and val.get("fidelity"):
        val_text += "  held-out " + "  ".join(f"cos[{k}]={v['cos']:.4f}" for k, v in val["fidelity"].items())
    log.info("epoch %d/%d [%s]  %s%s", record["epoch"], epochs, record["stage"], summary, val_text)
    for name, counts in teacher_batches.items():
        if counts:  # a stage without the teacher's losses has routed no batch to it yet
            log.info("teacher %s batches so far: %s", name, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def metrics_summary(experiment: str, stages: Sequence[Dict[str, Any]], history: List[Dict[str, Any]], tasks: Any,
                    seconds: float, world_size: int) -> Dict[str, Any]:
    """metrics.json's content: the epochs, the best epoch and the metric that picked it, the last
    held-out fidelity, the seconds trained (over every session of the run) and the world size."""
    best = next((r for r in reversed(history) if r.get("best")), None)
    last_val = next((r["val"] for r in reversed(history) if "val" in r), None)
    return {
        "experiment": experiment,
        "stages": list(stages),
        "epochs": history,
        "best_epoch": best["epoch"] if best else None,
        "best_val": best["val"] if best else None,
        # what picked best.pt: {head, metric, value} (mIoU for a semantic head, Dice for a binary one, ...)
        "best_metric": dict(zip(("head", "metric", "value"), primary_metric(best["val"], tasks)[:3]))
        if best else None,
        "final_fidelity": last_val.get("fidelity") if last_val else None,
        "train_seconds": round(seconds, 1),
        "world_size": world_size,
    }


def log_run_start(log: logging.Logger, exp: Any, model: torch.nn.Module, device: torch.device, amp: bool,
                  images: Sequence[int], sources: Mapping[str, Any], stages: Sequence[Any]) -> None:
    """The run's summary line: student, device and autocast, ``images`` (train, val), each teacher's
    source (``sources``: the router's), offline_ratio and the stages."""
    n_params = sum(p.numel() for p in model.parameters())
    modes = {
        n: ("offline" if s.cache is not None else "online") + (", live model loaded" if s.live and s.cache else "")
        for n, s in sources.items()
    }
    log.info(
        "student %s (%.2fM params) on %s (train.device=%s), bf16 autocast %s (train.amp=%s); %d train / %d val "
        "images; teachers: %s; offline_ratio=%s; stages: %s",
        exp.model.backbone["type"], n_params / 1e6, device, exp.train.device, "on" if amp else "off",
        str(exp.train.amp).lower(), images[0], images[1],
        ", ".join(f"{n} ({m})" for n, m in modes.items()) or "none", exp.distillation.offline_ratio,
        "; ".join(f"{s.name} epochs {s.first_epoch}-{s.last_epoch}" for s in stages),
    )


def warn_cellless(log: logging.Logger, epoch: int, counts: Mapping[str, int],
                  examples: Mapping[str, Sequence[str]]) -> None:
    """Per feature loss: ``counts`` training images of this epoch whose view had no valid cell on the
    student's grid (so that loss taught them nothing), ``examples`` their ids."""
    for name, n in counts.items():
        if n:
            log.warning("epoch %d: %d training image(s) had no valid cell on the student grid for "
                        "distillation.losses.%s, so no distillation signal (e.g. %s): an image whose content "
                        "is thinner than one student cell after the letterbox; a larger data.img_size or a "
                        "finer student level gives it cells", epoch, n, name, ", ".join(examples[name][:5]))


class EpochSums:
    """Running sums of one epoch's step logs (name -> sum, name -> count), averaged over every rank at the
    epoch's end; for a set mixing labelled and unlabelled images also the images of each kind seen (summed,
    not averaged: only rank 0 counts 1). Its state is saved mid-epoch so a resumed epoch continues its sums."""

    def __init__(self, sums: Optional[Mapping[str, float]] = None, counts: Optional[Mapping[str, int]] = None):
        self.sums, self.counts = dict(sums or {}), dict(counts or {})

    def add(self, logs: Mapping[str, float]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def add_images(self, labelled: int, total: int, is_main: bool) -> None:
        for k, v in (("images_labelled", labelled), ("images_unlabelled", total - labelled)):
            self.sums[k], self.counts[k] = self.sums.get(k, 0.0) + v, int(is_main)

    def state(self) -> Tuple[Dict[str, float], Dict[str, int]]:
        return self.sums, self.counts


def cellless_counts(distiller: Any, ctx: Any, log: logging.Logger, epoch: int) -> Dict[str, int]:
    """Per feature loss: training images of this epoch (all ranks) with no valid cell on the student's grid."""
    cellless = distiller.take_cellless()
    means = ctx.sum_logs({k: float(len(v)) for k, v in cellless.items()}, {k: 1 for k in cellless})
    counts = {k: int(round(v * ctx.world_size)) for k, v in means.items()}
    warn_cellless(log, epoch, counts, cellless)
    return counts
