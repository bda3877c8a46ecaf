"""Feature distillation losses: adapted student map vs teacher map on the student's grid."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.adapters import ChannelAdapter
from vfmkd.distillation.terms import FEATURE_LOG_PREFIX, LossEntry, LossTerm, TermContext, closest_stride_level


class FeatureDistillLoss(nn.Module, ABC):
    """Channel adapter + a comparison of the adapted student map with the teacher map.

    ``forward(student (B, C_s, H, W), teacher (B, C_t, H, W), mask (B, 1, H, W))`` returns
    ``(loss, cosine)``: the loss and the mean cosine similarity between adapted student and teacher
    vectors over valid locations (what users judge distillation by). Subclasses define
    :meth:`compare`; per-location losses subclass :class:`PerLocationLoss` and define a distance.
    """

    kind = "feature"

    def __init__(
        self,
        teacher: str,
        student_channels: int,
        teacher_channels: int,
        student_level: Optional[str] = None,
        teacher_feature: Optional[str] = None,
        adapter_hidden: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.student_level = student_level
        self.teacher_feature = teacher_feature
        self.adapter = ChannelAdapter(student_channels, teacher_channels, adapter_hidden)

    @abstractmethod
    def compare(self, adapted: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) adapted student, (B, C, H, W) teacher, (B, 1, H, W) mask -> scalar loss."""

    @classmethod
    def build_term(cls, entry: LossEntry, context: TermContext) -> Union[LossTerm, List[LossTerm]]:
        """The term of a feature loss entry: its teacher map (``teacher_feature``, default the
        teacher's primary map), the student level (``student_level``, default the one of the closest
        stride) and both channel sizes resolved here (a loss never reads config); logged as
        ``loss_feat_distill_<teacher>``. An entry naming several maps (``teacher_features``, paired
        with ``student_levels``: a list or ``auto``) gives one term per pair (:func:`level_entries`)."""
        if "teacher_features" in entry.kwargs or "student_levels" in entry.kwargs:
            return [cls.build_term(sub, context) for sub in level_entries(entry, context)]
        where, kwargs = entry.where, entry.kwargs
        teacher = kwargs.get("teacher")
        t_specs = teacher_maps(where, teacher, context)
        t_name = kwargs.get("teacher_feature") or context.primary[teacher]
        if t_name not in t_specs:
            raise ConfigError(f"{where}: teacher '{teacher}' provides {sorted(t_specs)}, not '{t_name}'")
        levels = context.student_levels()
        level = kwargs.get("student_level") or closest_stride_level(levels, t_specs[t_name].stride)
        if level not in levels:
            raise ConfigError(f"{where}: the student backbone has levels {sorted(levels)}, not '{level}'")
        kwargs.update(teacher_feature=t_name, student_level=level, student_channels=levels[level].channels,
                      teacher_channels=t_specs[t_name].channels)
        module = LOSSES.build(entry.type, where=where, **kwargs)
        return entry.term(cls.kind, module, f"{FEATURE_LOG_PREFIX}{teacher}")

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        adapted = self.adapter(student.float())
        teacher = teacher.float()
        mask = mask.float()
        return self.compare(adapted, teacher, mask), masked_cosine(adapted, teacher, mask)


def teacher_maps(where: str, teacher: Any, context: TermContext) -> Mapping[str, Any]:
    """Map name -> FeatureSpec of an enabled ``teacher``; a ConfigError naming the enabled ones otherwise."""
    if teacher not in context.teacher_specs:
        raise ConfigError(
            f"{where}: teacher '{teacher}' is not an enabled teacher of this experiment (enabled: "
            f"{sorted(context.teacher_specs)}); set 'teacher:' to one of them or enable it under teachers.")
    return {s.name: s for s in context.teacher_specs[teacher]}


def level_entries(entry: LossEntry, context: TermContext) -> List[LossEntry]:
    """One single-level entry per (teacher map, student level) pair of a multi-level entry:
    ``teacher_features: [fpn_s4, fpn_s8, fpn_s16]`` with ``student_levels: auto`` (the default: the
    student backbone level of the same stride) or a list in the same order (``[P3, P4, P5]``). Each is
    named ``<entry>_<level>`` and logged as ``<log_as or loss_feat_distill_<teacher>>_<level>``; the
    weight is the entry's, and a stage naming the entry names all its pairs (``LossTerm.parent``)."""
    where, kwargs = entry.where, dict(entry.kwargs)
    maps, levels = kwargs.pop("teacher_features", None), kwargs.pop("student_levels", "auto")
    if not isinstance(maps, (list, tuple)) or not maps or kwargs.get("teacher_feature") or kwargs.get("student_level"):
        raise ConfigError(f"{where}: a multi-level entry names its teacher maps as a list, teacher_features: "
                          f"[fpn_s4, fpn_s8, fpn_s16], with student_levels: auto or a list of levels, and no "
                          f"teacher_feature / student_level (got teacher_features: {maps!r}, "
                          f"student_levels: {levels!r})")
    teacher = kwargs.get("teacher")
    t_specs = teacher_maps(where, teacher, context)
    unknown = [m for m in maps if m not in t_specs]
    if unknown:
        raise ConfigError(f"{where}: teacher '{teacher}' provides {sorted(t_specs)}, not {unknown}")
    pairs = list(zip(maps, _paired_levels(where, [t_specs[m] for m in maps], levels, context.student_levels())))
    base = entry.log_as or f"{FEATURE_LOG_PREFIX}{teacher}"
    return [replace(entry, name=f"{entry.name}_{level}", log_as=f"{base}_{level}", parent=entry.name,
                    kwargs={**kwargs, "teacher_feature": name, "student_level": level}) for name, level in pairs]


def _paired_levels(where: str, maps: Sequence[Any], levels: Any, student: Mapping[str, Any]) -> List[str]:
    """The student level of each teacher map: ``levels`` checked (a list: same count, known levels) or,
    with ``auto``, the level of the same stride; a refusal names the fix."""
    have = ", ".join(f"{s.name} (stride {s.stride:g})" for s in student.values())
    if levels == "auto":
        by_stride = {s.stride: s.name for s in student.values()}
        missing = [f"{m.name} (stride {m.stride:g})" for m in maps if m.stride not in by_stride]
        if missing:
            hint = ", ".join(list(student)[:len(maps)])
            raise ConfigError(f"{where}: student_levels: auto pairs by stride, but the student backbone has no level "
                              f"for {', '.join(missing)} (levels: {have}); name one level per map in order, e.g. "
                              f"student_levels: [{hint}], or drop those maps from teacher_features")
        chosen = [by_stride[m.stride] for m in maps]
    elif isinstance(levels, (list, tuple)):
        if len(levels) != len(maps):
            raise ConfigError(f"{where}: teacher_features names {len(maps)} maps ({', '.join(m.name for m in maps)}) "
                              f"but student_levels {len(levels)} levels ({', '.join(map(str, levels))}); give one "
                              f"level per map in the same order, or student_levels: auto (pairs by stride)")
        bad = [str(v) for v in levels if v not in student]
        if bad:
            raise ConfigError(f"{where}: student_levels {bad} are not levels of the student backbone ({have})")
        chosen = [str(v) for v in levels]
    else:
        raise ConfigError(f"{where}: student_levels must be auto or a list of backbone levels ({have}), got {levels!r}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"{where}: student_levels {chosen} uses a level twice; pair each teacher map with its own "
                          f"level")
    return chosen


class PerLocationLoss(FeatureDistillLoss):
    """A per-location distance averaged over valid locations; subclasses define :meth:`distance`."""

    @abstractmethod
    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) x2 -> (B, 1, H, W) per-location distance."""

    def compare(self, adapted: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.distance(adapted, teacher) * mask).sum() / mask.sum().clamp_min(1.0)


def masked_cosine(adapted: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of (B, C, H, W) vectors over a (B, 1, H, W) mask (no gradient).

    Shared so that losses with their own ``forward`` (affinity) report the same number as the rest.
    """
    with torch.no_grad():
        cos = F.cosine_similarity(adapted, teacher, dim=1, eps=1e-6).unsqueeze(1)
        return (cos * mask).sum() / mask.sum().clamp_min(1.0)


@LOSSES.register("feature_mse")
class FeatureMSELoss(PerLocationLoss):
    """Mean squared error per channel, averaged over valid locations."""

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (student - teacher).pow(2).mean(dim=1, keepdim=True)


@LOSSES.register("feature_smooth_l1")
class FeatureSmoothL1Loss(PerLocationLoss):
    """torch's smooth L1 per element, mean over channels, averaged over valid locations.

    Shapes as :class:`FeatureDistillLoss`. With ``d = student - teacher`` per element:
    ``l(d) = 0.5 * d**2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 * beta``; ``beta = 0`` is plain L1.
    Less dominated by a few large teacher activations (ViT outlier channels) than MSE.
    """

    # The base signature is repeated (not **kwargs) because the registry validates config keys
    # against this exact signature; **kwargs would switch that check off.
    def __init__(
        self,
        teacher: str,
        student_channels: int,
        teacher_channels: int,
        student_level: Optional[str] = None,
        teacher_feature: Optional[str] = None,
        adapter_hidden: Optional[int] = None,
        beta: float = 1.0,
    ) -> None:
        super().__init__(teacher, student_channels, teacher_channels, student_level, teacher_feature, adapter_hidden)
        if beta < 0:
            raise ConfigError(f"feature_smooth_l1: beta must be >= 0 (0 means L1), got {beta}")
        self.beta = float(beta)

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(student, teacher, reduction="none", beta=self.beta).mean(dim=1, keepdim=True)


@LOSSES.register("feature_cosine")
class FeatureCosineLoss(PerLocationLoss):
    """``1 - cos(student_vec, teacher_vec)`` per location, averaged over valid locations.

    Shapes as :class:`FeatureDistillLoss`. Matches direction only, so it is indifferent to the
    teacher's feature scale (useful when teachers with very different norms are mixed).
    """

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(student, teacher, dim=1, eps=1e-6).unsqueeze(1)
