"""A built loss entry (:class:`LossTerm`) and what a loss class is handed to build its own:
the entry (:class:`LossEntry`) and the run it joins (:class:`TermContext`).

Every loss class has one hook, ``build_term(entry, context) -> LossTerm`` (a classmethod; a list of
terms for an entry that expands into several, e.g. a multi-level feature entry); the builder looks the
loss up in ``LOSSES`` and calls it. The loss bases implement it once per kind:
feature losses (:class:`~vfmkd.distillation.losses.feature.FeatureDistillLoss`: teacher map, student
level, channel sizes), task losses (:class:`~vfmkd.distillation.losses.task.TaskLoss`: the head),
output losses (:class:`~vfmkd.distillation.losses.kd.OutputDistillLoss`: head and pairing, from
:mod:`vfmkd.distillation.pairing`) and the promptable head's losses
(:mod:`vfmkd.distillation.losses.promptable`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Protocol, Sequence, Tuple

import torch

from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.datasets.records import Batch

FEATURE_LOG_PREFIX = "loss_feat_distill_"
#: Keys of a loss entry that the engine uses itself instead of passing to the loss.
RESERVED_LOSS_KEYS = ("weight", "log_as")


class TermPairing(Protocol):
    """What the distiller asks of an output term's pairing (see :mod:`vfmkd.distillation.pairing`)."""

    needs_masks: bool

    def pair(self, output: Any, batch: Batch, target: Any) -> Optional[Tuple[tuple, dict]]:
        """The loss's ``(args, kwargs)`` for this step, or None when nothing pairs."""

    def sampling_state(self) -> Dict[str, torch.Tensor]:
        """Random-generator states an exact resume restores."""

    def load_sampling_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restores :meth:`sampling_state`."""


@dataclass
class LossTerm:
    """One entry of ``distillation.losses``, built. ``kind``: task | output | feature (which group
    weight scales it); ``head``: the model head a task or output loss reads; ``module``: the loss
    itself (feature losses carry their channel adapter, teacher, teacher feature and student level;
    output losses their teacher); ``pairing``: how an output term pairs the head's output with its
    teacher's targets (:class:`~vfmkd.distillation.pairing.output_pairs.OutputPairing`); ``parent``: the
    entry a multi-level entry's pair came from ('' for an entry of its own; stages may name the parent)."""

    name: str
    kind: str
    weight: float
    log_name: str
    module: Any
    head: str = ""
    pairing: Optional[TermPairing] = None
    parent: str = ""

    @property
    def teacher(self) -> str:
        return (getattr(self.module, "teacher", "") or "") if self.kind in ("feature", "output") else ""


@dataclass
class LossEntry:
    """One ``distillation.losses`` entry as a loss's hook reads it: its ``name``, registered
    ``type``, ``weight``, ``log_as`` ('' for the loss's default log name) and ``kwargs`` (the keys
    its constructor takes, the engine's keys removed; the hook may pop the ones it resolves itself,
    e.g. ``head``). ``where``: the config path errors name; ``parent``: the multi-level entry this one
    pair of was expanded from ('' for an entry of the config)."""

    name: str
    type: str
    weight: float = 1.0
    log_as: str = ""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    parent: str = ""

    @property
    def where(self) -> str:
        return f"distillation.losses.{self.parent or self.name}"

    def term(self, kind: str, module: Any, default_log: str, head: str = "",
             pairing: Optional[TermPairing] = None) -> LossTerm:
        """The built :class:`LossTerm` (logged under ``log_as`` or ``default_log``)."""
        return LossTerm(self.name, kind, self.weight, self.log_as or default_log, module, head, pairing, self.parent)


@dataclass(frozen=True)
class TermContext:
    """The run a loss term joins, known when the losses are built.

    ``model``: the student (``UnifiedModel``: its ``heads`` and ``backbone.feature_specs()``).
    ``teacher_specs``: teacher name -> the feature maps it provides; ``primary``: teacher name -> its
    primary map. ``offers``: teacher name -> what it offers output distillation
    (:class:`~vfmkd.distillation.pairing.output_rules.TeacherOutputs`). ``class_channels``: head
    task -> detection class id -> logit channel of such a head (semantic/binary heads taught by
    box-prompted teacher masks; see ``vfmkd.engine.builders.output_class_channels``)."""

    model: Any
    teacher_specs: Mapping[str, Sequence[FeatureSpec]]
    primary: Mapping[str, str]
    offers: Mapping[str, Any]
    class_channels: Mapping[str, Sequence[int]] = field(default_factory=dict)

    def student_levels(self) -> Dict[str, FeatureSpec]:
        return {s.name: s for s in self.model.backbone.feature_specs()}

    def output_teacher(self, entry: LossEntry) -> str:
        """The teacher an output entry distils (``teacher:``): one of :attr:`offers`, else a
        :class:`ConfigError` listing them."""
        teacher = entry.kwargs.get("teacher")
        if teacher not in self.offers:
            raise ConfigError(
                f"{entry.where}: {entry.type} distils a teacher's outputs; 'teacher: {teacher}' is not an enabled "
                f"teacher of this experiment (enabled: {sorted(self.offers)}); set 'teacher:' to one of them.")
        return teacher

    def model_head(self, where: str, head: str) -> Any:
        """The student head ``head`` (a :class:`ConfigError` listing the heads when there is none)."""
        if head not in self.model.heads:
            raise ConfigError(f"{where}: the model has no head '{head}' (heads: {list(self.model.heads)})")
        return self.model.heads[head]


def closest_stride_level(levels: Mapping[str, FeatureSpec], stride: int) -> str:
    """The level whose stride is nearest ``stride`` (in log2)."""
    return min(levels.values(), key=lambda s: abs(math.log2(s.stride) - math.log2(stride))).name


def missing_hook_error(where: str, loss_type: str, loss_cls: Any) -> ConfigError:
    """The refusal of a registered loss that cannot build its own term."""
    what = getattr(loss_cls, "__name__", repr(loss_cls))
    return ConfigError(
        f"{where}: loss '{loss_type}' ({what}) has no build_term hook, so the engine cannot build its term. "
        "Subclass one of vfmkd's loss bases (FeatureDistillLoss or PerLocationLoss for feature losses, TaskLoss for "
        "task losses, OutputDistillLoss for output losses) or implement "
        "`@classmethod build_term(cls, entry: LossEntry, context: TermContext) -> LossTerm` "
        "(vfmkd.distillation.terms; docs/adding_a_loss.md).")

