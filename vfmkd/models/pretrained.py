"""Initialise a student from a pretrained file (``model.init``): an ultralytics YOLOv8 checkpoint, a
timm checkpoint of the backbone, or an earlier vfmkd run's ``checkpoints/best.pt``.

Each format has its own reader that turns the file into tensors named as in the student
(:mod:`vfmkd.models.pretrained_ultralytics`, :mod:`vfmkd.models.pretrained_timm`); this module detects
the format, keeps the requested parts, copies every tensor whose name and shape fit and reports the
rest (:class:`InitReport`). Files are read with ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.utils.checkpoint import unwrap_state_dict

PARTS = ("backbone", "neck", "heads")
_SHOWN = 5  # names listed per category in the log and in errors


@dataclass
class SourceTensors:
    """What a reader found in a file: ``tensors`` named as in the student (``backbone.stem.0.conv.weight``),
    ``unplaced`` file tensors that have no counterpart in the student, ``dropped`` ones left out on
    purpose (a classifier), ``parts`` the student parts the file can initialise, ``covers`` the student
    prefixes it should fill completely (others, e.g. a ViT's feature pyramid, are vfmkd's own) and
    ``notes`` for the log."""

    kind: str
    tensors: Dict[str, torch.Tensor]
    parts: Tuple[str, ...]
    unplaced: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    covers: Tuple[str, ...] = ()  # student prefixes the file is meant to fill (default: whole parts)


@dataclass
class InitReport:
    """The outcome of :func:`initialise_student`; names are the student's (file names for ``skipped``)."""

    source: str
    kind: str
    parts: Tuple[str, ...]
    loaded: List[str]
    skipped: List[str]  # file tensors with no place in the requested parts of the student
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]  # (name, file shape, student shape)
    missing: List[str]  # student tensors of the requested parts the file does not hold (left as initialised)
    dropped: List[str]
    notes: List[str]

    def problems(self) -> List[str]:
        out = []
        if self.skipped:
            out.append(f"{len(self.skipped)} skipped (no place in the student: {_first(self.skipped)})")
        if self.mismatched:
            out.append(f"{len(self.mismatched)} shape-mismatched ("
                       + ", ".join(f"{n} file {list(a)} vs student {list(b)}" for n, a, b in self.mismatched[:_SHOWN])
                       + (", ..." if len(self.mismatched) > _SHOWN else "") + ")")
        if self.missing:
            out.append(f"{len(self.missing)} missing from the file (kept as initialised: {_first(self.missing)})")
        return out

    def summary(self) -> str:
        per_part = Counter(n.split(".", 1)[0] for n in self.loaded)
        lines = [f"model.init: {self.kind} file {self.source} -> {', '.join(self.parts)}: loaded {len(self.loaded)} "
                 f"tensors ({', '.join(f'{p} {per_part[p]}' for p in self.parts)}), skipped {len(self.skipped)}, "
                 f"shape-mismatched {len(self.mismatched)}, missing {len(self.missing)}"]
        lines += [f"  {p}" for p in self.problems()]
        if self.dropped:
            lines.append(f"  {len(self.dropped)} dropped on purpose: {_first(self.dropped)}")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def _first(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")


def key_prefixes(names: Sequence[str], depth: int = 1, shown: int = 4) -> str:
    """The most common leading components of ``names`` (``image_encoder., mask_decoder.``): what a file is."""
    common = Counter(".".join(n.split(".")[:depth]) for n in names).most_common(shown)
    return ", ".join(f"{p}.*" for p, _ in common) or "nothing"


def read_source(path: Path, model: nn.Module) -> SourceTensors:
    """Detect the file's format and read it into student-named tensors."""
    from vfmkd.models import pretrained_timm, pretrained_ultralytics

    if path.suffix == ".safetensors":
        return pretrained_timm.timm_source(pretrained_timm.read_timm_file(path), model, path)
    obj = pretrained_ultralytics.load_allowing_ultralytics(path)
    yolo = pretrained_ultralytics.ultralytics_model(obj)
    if yolo is not None:
        return pretrained_ultralytics.yolov8_source(yolo, model, path)
    try:
        state = unwrap_state_dict(obj)
    except CheckpointError:  # other wrappers (timm's state_dict_ema): the timm reader says what it expects
        state = {}
    if state and sum(k.split(".", 1)[0] in PARTS for k in state) > len(state) / 2:
        kind = "vfmkd run" if isinstance(obj.get("config"), dict) else "vfmkd state dict"
        return SourceTensors(kind, state, tuple(p for p in PARTS if any(k.startswith(p + ".") for k in state)))
    return pretrained_timm.timm_source(obj, model, path)


def initialise_student(model: nn.Module, source: str, parts: Optional[Sequence[str]] = None,
                       strict: bool = False) -> InitReport:
    """Copy the pretrained tensors of ``source`` into ``model`` (a UnifiedModel) in place.

    ``parts``: which of backbone / neck / heads to initialise (default: every part the file holds; naming
    one it lacks is an error). ``strict``: any skipped, shape-mismatched or missing tensor is a
    ConfigError. A file of which nothing fits the student is always an error (another model family)."""
    path = Path(source)
    parts = [parts] if isinstance(parts, str) else parts
    if parts is not None:
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise ConfigError(f"model.init.parts: {unknown or 'empty'} not among {list(PARTS)}; e.g. parts: [backbone, "
                              "neck]")
    found = read_source(path, model)
    chosen = tuple(p for p in PARTS if p in (parts or found.parts))
    lacking = [p for p in chosen if p not in found.parts]
    if lacking:
        raise ConfigError(f"model.init: {path} ({found.kind}) holds no {', '.join(lacking)} weights, only "
                          f"{', '.join(found.parts) or 'nothing usable'}; set model.init.parts to {list(found.parts)}")
    own = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in chosen}
    loaded, mismatched, skipped = [], [], list(found.unplaced)
    updates: Dict[str, torch.Tensor] = {}
    for name, tensor in found.tensors.items():
        if name.split(".", 1)[0] not in chosen:
            continue
        if name not in own:
            skipped.append(name)
        elif tuple(tensor.shape) != tuple(own[name].shape):
            mismatched.append((name, tuple(tensor.shape), tuple(own[name].shape)))
        else:
            updates[name] = tensor
            loaded.append(name)
    missing = [k for k in own if k not in updates and (not found.covers or k.startswith(found.covers))]
    report = InitReport(str(path), found.kind, chosen, loaded, skipped, mismatched, missing, found.dropped, found.notes)
    learned = {n for n, p in model.named_parameters() if p.requires_grad}
    # A part with no learned tensor loaded (BatchNorm step counters and fixed buffers such as DFL's bins are
    # no weights) is a file of another model or size: a yolov8s run's file fits only a yolov8n's head convs.
    unfit = [p for p in chosen if not any(n in learned and n.startswith(p + ".") for n in loaded)]
    if parts is None and unfit == ["heads"]:  # by default, heads of other names or types are left as built
        report.notes.append("no head tensor fits the student's heads (other head names or types): heads kept as "
                            "initialised")
        unfit = []
    if unfit:
        shapes = "".join(f"; {n} is {list(a)} in the file, {list(b)} in the student"
                         for n, a, b in [m for m in mismatched if m[0].startswith(unfit[0] + ".")][:1])
        fitting = [p for p in chosen if p not in unfit]
        or_parts = f" (or set model.init.parts to {fitting})" if fitting else ""
        raise CheckpointError(
            f"model.init: nothing in {path} fits the student's {', '.join(unfit)} (the file holds "
            f"{key_prefixes(list(found.tensors) + found.unplaced, depth=2)}{shapes}): it is a checkpoint of another "
            f"model or size{or_parts}; "
            f"model.init.from takes an ultralytics YOLOv8 .pt, a timm checkpoint of the backbone or a vfmkd run's "
            f"checkpoints/best.pt")
    if strict and report.problems():
        raise ConfigError(f"model.init (strict: true): {path}: " + "; ".join(report.problems())
                          + "; fix the file or the student, or set model.init.strict=false")
    with torch.no_grad():
        for name, tensor in updates.items():
            own[name].copy_(tensor)  # state_dict tensors share storage with the parameters and buffers
    return report
