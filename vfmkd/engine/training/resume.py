"""Exact resume: what a checkpoint must hold so a killed run continues as if it never stopped.

Everything random in a run is either derived from (seed, epoch, index/step) — augmentation draws,
the router's offline/online draws — or lives in a generator whose state is saved here: torch's,
numpy's and Python's global RNGs and the DataLoader's shuffling generator at the start of the
epoch in progress. States are stored as tensors and plain lists (``weights_only`` loadable).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.utils.checkpoint import load_checkpoint, previous_of
from vfmkd.utils.logging import get_logger

if TYPE_CHECKING:
    from vfmkd.engine.training.trainer import Trainer

# Config sections a resumed run must share with the checkpoint (they define what was trained on
# what); everything else (epochs, stages, eval, logging, workers) may change, with a warning.
FROZEN_KEYS = ("model", "teachers", "distillation", "data.dataset", "data.root", "data.train_split",
               "data.img_size", "data.batch_size", "data.limit", "data.augment", "train.seed", "train.accumulate",
               "train.optimizer")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators at a run's start (the student's initial
    weights follow it); :func:`capture_rng` / :func:`restore_rng` carry their state across a resume."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng() -> Dict[str, Any]:
    """The global RNG states (torch, numpy, python) in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


class RunFinished(Exception):
    """``--resume`` of a run that already trained all its epochs: nothing to do (not an error)."""


def resume_checkpoint(path: Path) -> Tuple[Path, Dict[str, Any]]:
    """The checkpoint to resume and its state: ``path`` itself (a .pt) or ``<run>/checkpoints/last.pt``;
    when that one cannot be loaded (truncated, damaged) the one it replaced (``last.prev.pt``), with
    a warning. When neither can be loaded the run cannot continue: the error names both files and
    the command that starts it afresh."""
    path = Path(path)
    ckpt = path / "checkpoints" / "last.pt" if path.is_dir() else path
    previous = previous_of(ckpt)
    if not ckpt.is_file() and not previous.is_file():
        raise CheckpointError(f"--resume {path}: no checkpoint at {ckpt} (pass a run directory or its "
                              "checkpoints/last.pt)")
    reasons = []
    for candidate in (ckpt, previous):
        if not candidate.is_file():
            continue
        try:
            state = load_checkpoint(candidate)
        except CheckpointError as exc:
            reasons.append(str(exc).splitlines()[0].split(". An interrupted")[0])  # its advice is about downloads
            continue
        if reasons:
            get_logger().warning("cannot resume: %s; falling back to the previous checkpoint %s", reasons[0], candidate)
        return candidate, state
    run = ckpt.parent.parent
    raise CheckpointError(
        f"--resume {path}: no usable checkpoint is left ({'; '.join(reasons)}), so this run cannot continue. "
        f"Start a new run with its config: python tools/train.py --config {run / 'config.yaml'}")


def check_finished(state: Mapping[str, Any], epochs: int, checkpoint: Path) -> None:
    """Raise :class:`RunFinished` when ``state`` (a last.pt) resumes past the run's last epoch."""
    r = state["resume"]
    if int(r["batch"]) == 0 and int(r["epoch"]) > epochs:
        run = checkpoint.parent.parent
        raise RunFinished(
            f"{run} already finished its {epochs} epoch(s); nothing to do (metrics.json and the checkpoints are "
            f"unchanged). To train longer: python tools/train.py --resume {run} train.epochs={epochs + 10}")


def resumable_state(resume: Path, cfg: Mapping[str, Any]) -> Tuple[Path, Dict[str, Any]]:
    """The checkpoint ``--resume`` names and its state, checked against ``cfg`` (the same setup, epochs
    left to train) before anything is built or written."""
    checkpoint, state = resume_checkpoint(resume)
    if "resume" not in state:
        raise CheckpointError(f"{checkpoint} holds no training state to resume (written by an older vfmkd?)")
    check_resume_config(state["config"], cfg, checkpoint)
    check_finished(state, int(cfg["train"]["epochs"]), checkpoint)
    return checkpoint, state


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    """(refused, allowed): ``key: saved -> current`` lines for every differing leaf."""
    a, b = _flatten(saved), _flatten(current)
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            frozen = any(key == f or key.startswith(f + ".") for f in FROZEN_KEYS)
            (refused if frozen else allowed).append(line)
    return refused, allowed


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: Path) -> None:
    """Refuse a resume whose model, teachers, losses, data or seed differ from the checkpoint's;
    warn about the rest (e.g. more epochs)."""
    refused, allowed = config_changes(saved, current)
    if refused:
        raise ConfigError(
            f"cannot resume {checkpoint} with a different setup (the weights and the data order would not "
            f"continue the same run):\n  " + "\n  ".join(refused)
            + "\nResume with the run's own config.yaml (the default of --resume), or start a new run.")
    if allowed:
        get_logger().warning("resuming %s with changed settings:\n  %s", checkpoint, "\n  ".join(allowed))


def training_state(trainer: Trainer, epoch: int, metrics: Dict[str, Any],
                   resume_at: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """What ``checkpoints/*.pt`` holds: the weights, the optimizer and everything
    :func:`restore_training_state` needs. ``epoch``: the last completed epoch; ``resume_at`` (epoch,
    batch): where a resume continues (default: the start of the next epoch)."""
    t = trainer
    resume_epoch, resume_batch = resume_at or (epoch + 1, 0)
    generator = t._epoch_generator if resume_batch else t.train_loader.generator.get_state()
    return {
        "model": t.model.state_dict(),
        "distiller": t.distiller.state_dict(),
        "teacher_stats": t.distiller.teacher_stats(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "epoch": epoch,
        "config": t.cfg,
        "metrics": metrics,
        "resume": {
            "epoch": resume_epoch, "batch": resume_batch, "step": t.step,
            "optimizer_steps": t.optimizer_steps,
            "partial_sums": dict(t._partial[0]) if resume_batch else {},
            "partial_counts": dict(t._partial[1]) if resume_batch else {},
            "history": t.history, "best_fitness": t.best_fitness,
            "router_counts": t.router.summary(), "loader_generator": generator, "rng": capture_rng(),
            "sampling": t.distiller.sampling_states(),
            "world_size": t.ctx.world_size, "train_seconds": t.train_seconds(),
        },
    }


def restore_training_state(trainer: Trainer, state: Dict[str, Any]) -> None:
    """Continue the run a checkpoint of :func:`training_state` describes."""
    t = trainer
    t.model.load_state_dict(state["model"])
    t.distiller.load_state_dict(state["distiller"])
    t.distiller.load_teacher_stats(state.get("teacher_stats", {}))
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    r = state["resume"]
    if int(r.get("world_size", 1)) != t.ctx.world_size:
        raise ConfigError(f"the checkpoint was written by a run of {r.get('world_size', 1)} process(es), this one "
                          f"has {t.ctx.world_size}: the data order would not continue; resume with the same "
                          "world size")
    t.start_epoch, t.start_batch = int(r["epoch"]), int(r["batch"])
    t.step, t.optimizer_steps = int(r["step"]), int(r["optimizer_steps"])
    t._partial = (dict(r["partial_sums"]), dict(r["partial_counts"]))
    t.history, t.best_fitness = list(r["history"]), float(r["best_fitness"])
    for name, counts in r["router_counts"].items():
        t.router.counts[name].update(counts)
    t._epoch_generator = r["loader_generator"]
    t.train_loader.generator.set_state(r["loader_generator"])
    restore_rng(r["rng"])
    t.distiller.load_sampling_states(r.get("sampling", {}))
    t._seconds_before = float(r.get("train_seconds", 0.0))
    t.log.info("resumed at epoch %d, batch %d (step %d)", t.start_epoch, t.start_batch, t.step)
