"""Turns a student forward pass and each teacher's targets into the weighted training loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from vfmkd.cache.phi_s import PhiS
from vfmkd.core.errors import ConfigError, NonFiniteLossError  # noqa: F401  (re-exported)
from vfmkd.datasets.records import Batch
from vfmkd.distillation.geometry import resample_to_student
from vfmkd.distillation.losses import FeatureDistillLoss
from vfmkd.distillation.losses.feature import masked_cosine
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.distillation.terms import FEATURE_LOG_PREFIX, RESERVED_LOSS_KEYS, LossTerm  # noqa: F401  (re-exported)
from vfmkd.distillation.weighting import combine
from vfmkd.models.unified_model import StudentOutput

#: Per-group sums of ``weight x term`` (the total is alpha x task + beta x kd + gamma x feat).
GROUP_LOGS: Dict[str, str] = {"task": "loss_task", "output": "loss_kd", "feature": "loss_feat"}
#: ``loss_distill_<teacher>``: one teacher's share of the total (its output + feature terms, each
#: x its weight x beta or gamma); with a teacher named ``sam`` this is the design's ``loss_sam_distill``.
TEACHER_LOG_PREFIX = "loss_distill_"


def cosine_log_name(log_name: str) -> str:
    """The name a feature term's cosine is logged under: ``loss_feat_distill_sam`` -> ``cos_sam``,
    any other ``log_as`` name ``x`` -> ``cos_x`` (never the loss's own name)."""
    return "cos_" + (log_name[len(FEATURE_LOG_PREFIX):] if log_name.startswith(FEATURE_LOG_PREFIX) else log_name)


@dataclass
class LossResult:
    """``total``: the scalar to backpropagate; ``logs``: every term, cosine and the total as floats;
    ``problem``: why the step must be refused (a NaN/inf term or total), '' when it is fine."""

    total: torch.Tensor
    logs: Dict[str, float]
    problem: str = ""


class Distiller(nn.Module):
    """Task losses on the student's heads plus feature distillation against each teacher.

    ``forward(out, batch, targets)`` -> :class:`LossResult`; ``targets[name]`` are teacher
    ``name``'s :class:`TeacherTargets` for this batch (a teacher missing from ``targets`` is
    skipped this step, e.g. between ``distill_interval`` steps). With per-channel statistics set
    (:meth:`set_teacher_stats`) a teacher's maps are standardised before its adapter and loss.
    Total = ``alpha`` x task + ``beta`` x output-KD + ``gamma`` x feature terms, each term scaled by
    its weight. :meth:`set_stage` restricts the active terms and overrides weights (staged training).

    Output terms pair their head's output with their teacher's targets (``term.pairing``); a step
    whose targets hold nothing to pair (no mask logits, no box with a teacher mask) skips the term.
    Logs: every term under its ``log_name``, the group sums ``loss_task`` / ``loss_kd`` /
    ``loss_feat`` (sum of weight x term; the total is alpha/beta/gamma times them) and, per
    distilled teacher, ``loss_distill_<teacher>`` (its terms' share of the total).
    """

    def __init__(self, terms: Sequence[LossTerm], alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.terms = {t.name: t for t in terms}
        # Feature losses own trainable adapters: registered here so they train, save and move.
        self.feature_losses = nn.ModuleDict({t.name: t.module for t in terms if t.kind == "feature"})
        # Task terms with parameters (DSRL's training-only SR branch) train and save here, not in the model.
        self.task_modules = nn.ModuleDict(
            {t.name: t.module for t in terms if t.kind == "task" and isinstance(t.module, nn.Module)}
        )
        taken: Dict[str, str] = {}
        reserved = set(GROUP_LOGS.values()) | {"loss"}
        for t in terms:
            if t.log_name in reserved or t.log_name.startswith(TEACHER_LOG_PREFIX):
                raise ConfigError(
                    f"distillation.losses.{t.name}: log_as '{t.log_name}' is a name the distiller logs itself "
                    f"({', '.join(sorted(reserved))}, {TEACHER_LOG_PREFIX}<teacher>); choose another")
            if t.kind == "output" and t.pairing is None:
                raise ConfigError(f"distillation.losses.{t.name}: an output term needs its pairing (built by "
                                  "build_loss_terms)")
            names = [t.log_name] + ([cosine_log_name(t.log_name)] if t.kind == "feature" else [])
            for log_name in names:
                if log_name in taken:
                    raise ConfigError(
                        f"distillation.losses.{taken[log_name]} and .{t.name} would both log as '{log_name}'; "
                        f"give one of them its own name with log_as: <name>")
                taken[log_name] = t.name
        self._stats: Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._phi_s: Dict[Tuple[str, str], PhiS] = {}
        # feature term -> ids of training images whose view had no valid cell on the student grid
        # (no distillation signal from that term); read and cleared per epoch by take_cellless().
        self.cellless: Dict[str, Set[str]] = {}
        self.active: Set[str] = set(self.terms)
        self.weights: Dict[str, float] = {t.name: t.weight for t in terms}

    # ------------------------------------------------------------------ configuration
    def set_stage(self, active: Optional[Iterable[str]] = None, weights: Optional[Mapping[str, float]] = None) -> None:
        """Only ``active`` terms (all when None) count from now on, with ``weights`` overriding the
        configured ones; names are checked so a typo in a stage is an error, not a silent no-op. A
        multi-level entry's name stands for all its pairs (``LossTerm.parent``)."""
        pairs: Dict[str, List[str]] = {}
        for t in self.terms.values():
            if t.parent:
                pairs.setdefault(t.parent, []).append(t.name)
        active = None if active is None else [n for a in active for n in pairs.get(a, [a])]
        weights = {n: w for k, w in (weights or {}).items() for n in pairs.get(k, [k])}
        for where, names in (("losses", list(active or [])), ("weights", list(weights or {}))):
            unknown = sorted(set(names) - set(self.terms))
            if unknown:
                raise ConfigError(f"train.stages {where}: {unknown} are not entries of distillation.losses "
                                  f"({sorted(self.terms)}{', or ' + ', '.join(sorted(pairs)) if pairs else ''})")
        self.active = set(self.terms) if active is None else set(active)
        self.weights = {t.name: float((weights or {}).get(t.name, t.weight)) for t in self.terms.values()}

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Epoch ``epoch`` (1-based) of ``epochs`` begins: every term whose loss has a schedule over epochs
        (an ``on_epoch_start(epoch, epochs)`` method, e.g. YOLO26's one-to-many -> one-to-one gains) sets it.
        The state is a function of the epoch, so a resumed run gets it back by this call, not a checkpoint."""
        for t in self.terms.values():
            hook = getattr(t.module, "on_epoch_start", None)
            if hook is not None:
                hook(epoch, epochs)

    def sampling_states(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Per output term, the random-generator states of its pairing (prompt_distill's point prompts):
        what a checkpoint keeps so that a resumed run draws the prompts the uninterrupted one would."""
        states = {name: t.pairing.sampling_state() for name, t in self.terms.items() if t.pairing is not None}
        return {name: state for name, state in states.items() if state}

    def load_sampling_states(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for name, state in states.items():
            term = self.terms.get(name)
            if term is None or term.pairing is None:
                raise ValueError(f"the checkpoint holds prompt-sampling state for '{name}', which is not an output "
                                 f"term of this run ({sorted(self.terms)})")
            term.pairing.load_sampling_state(state)

    def set_teacher_stats(self, teacher: str, feature: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise ``teacher``'s ``feature`` maps as (x - mean) / std per channel from now on."""
        self._stats[(teacher, feature)] = (mean.float().view(1, -1, 1, 1),
                                           std.float().clamp_min(1e-6).view(1, -1, 1, 1))

    def set_teacher_phi_s(self, teacher: str, feature: str, phi_s: PhiS) -> None:
        """Standardise ``teacher``'s ``feature`` maps by PHI-S (:mod:`vfmkd.cache.phi_s`) from now on
        (``distillation.standardize: phi_s``); it takes precedence over a per-channel z-score."""
        self._phi_s[(teacher, feature)] = phi_s

    def teacher_stats(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The standardisation in force, as ``{"<teacher>/<feature>": {"mean", "std"}}`` (C,) for a
        checkpoint (PHI-S: ``{"mean", "rotation" (C, C), "alpha" ()}``); :meth:`load_teacher_stats` restores it."""
        out = {f"{t}/{f}": {"mean": m.flatten().cpu(), "std": s.flatten().cpu()} for (t, f),
               (m, s) in self._stats.items()}
        out.update({f"{t}/{f}": {"mean": p.mean.cpu(), "rotation": p.rotation.cpu(), "alpha": torch.tensor(p.alpha)}
                    for (t, f), p in self._phi_s.items()})
        return out

    def load_teacher_stats(self, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for key, value in stats.items():
            teacher, feature = key.split("/", 1)
            if "rotation" in value:
                self.set_teacher_phi_s(teacher, feature, PhiS(value["mean"], value["rotation"], float(value["alpha"])))
            else:
                self.set_teacher_stats(teacher, feature, value["mean"], value["std"])

    def feature_terms(self, active_only: bool = True) -> Dict[str, FeatureDistillLoss]:
        return {n: m for n, m in self.feature_losses.items()  # type: ignore[misc]
                if not active_only or n in self.active}

    def output_terms(self, active_only: bool = True) -> Dict[str, LossTerm]:
        return {n: t for n, t in self.terms.items() if t.kind == "output" and (not active_only or n in self.active)}

    def teachers_used(self, active_only: bool = True) -> Tuple[str, ...]:
        """Teachers some (active) feature or output term distils."""
        return tuple(sorted({m.teacher for m in self.feature_terms(active_only).values()}
                            | {t.teacher for t in self.output_terms(active_only).values()}))

    def teachers_needing_masks(self, active_only: bool = False) -> Tuple[str, ...]:
        """Teachers whose box-prompted mask logits some output term reads (mask_distill & co., and
        prompt_distill through :class:`~vfmkd.distillation.pairing.prompt_pairs.PromptPairing`): their live passes must
        be made with ``OnlineTeacher(masks=True)`` and their caches must hold masks
        (:func:`~vfmkd.distillation.pairing.output_pairs.check_mask_sources`)."""
        return tuple(sorted({t.teacher for t in self.output_terms(active_only).values() if t.pairing.needs_masks}))

    def teachers_needing_heads(self, active_only: bool = False) -> Tuple[str, ...]:
        """Teachers whose head outputs some output term reads (vfmkd teachers)."""
        return tuple(sorted({t.teacher for t in self.output_terms(active_only).values()
                             if getattr(t.pairing, "needs_heads", not t.pairing.needs_masks)}))

    def features_used(self, teacher: str) -> Tuple[str, ...]:
        return tuple(sorted({m.teacher_feature for m in self.feature_terms(False).values() if m.teacher == teacher}))

    # ------------------------------------------------------------------ computation
    def _teacher_map(self, module: FeatureDistillLoss, target: TeacherTargets, device: torch.device) -> torch.Tensor:
        fmap = target.feature(module.teacher_feature, device)
        phi_s = self._phi_s.get((module.teacher, module.teacher_feature))
        if phi_s is not None:
            return phi_s.apply(fmap)
        stats = self._stats.get((module.teacher, module.teacher_feature))
        if stats is not None:
            mean, std = stats
            fmap = (fmap - mean.to(device)) / std.to(device)
        return fmap

    def aligned(self, module: FeatureDistillLoss, out: StudentOutput, batch: Batch,
                target: TeacherTargets) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student level (B, C_s, H, W), teacher map on that grid (B, C_t, H, W), valid mask (B, 1, H, W))."""
        student = out.backbone[module.student_level]
        stride = batch.images.shape[-1] // student.shape[-1]
        student_affine = target.student_affine if target.student_affine is not None else batch.views.affine
        teacher_map, mask = resample_to_student(
            self._teacher_map(module, target, student.device), target.affine, target.valid_hw,
            (target.input_size, target.input_size), student_affine, tuple(student.shape[-2:]), stride,
        )
        if target.is_summary(module.teacher_feature):
            # A 1x1 summary (e.g. DINO's CLS token) is matched by the student level pooled over the
            # image region, not cell by cell.
            student = (student * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp_min(1.0)
            teacher_map, mask = teacher_map.mean((2, 3), keepdim=True), torch.ones_like(mask[..., :1, :1])
        return student, teacher_map, mask

    def forward(self, out: StudentOutput, batch: Batch, targets: Mapping[str, TeacherTargets],
                raise_non_finite: bool = True, teacher_scale: Optional[Mapping[str, float]] = None) -> LossResult:
        """The weighted loss of this step. A NaN/inf term (or total) raises NonFiniteLossError, or,
        with ``raise_non_finite=False`` (distributed steps decide together), is named in ``problem``.
        ``teacher_scale``: teacher -> factor on its terms' weights this step (teacher dropping's renormalisation)."""
        logs: Dict[str, float] = {}
        problem = ""
        values: Dict[str, torch.Tensor] = {}
        for name in sorted(self.active):
            term = self.terms[name]
            if term.kind == "task" and getattr(term.module, "reads_student_output", False):
                value, items = term.module(out, batch)  # e.g. DSRL: logs its parts under their own names
                logs.update({k: float(v) for k, v in items.items()})
            elif term.kind == "task":
                value, items = term.module(out.heads[term.head], batch)
                logs.update({f"{term.log_name}_{k}": float(v) for k, v in items.items()})
            elif term.kind == "output":
                target = targets.get(term.teacher)
                if target is None:  # not distilled this step (distill_interval)
                    continue
                pair = term.pairing.pair(out.heads[term.head], batch, target)
                if pair is None:  # nothing of this teacher pairs with the head this step
                    continue
                args, kwargs = pair
                value = term.module(*args, **kwargs)
            else:
                target = targets.get(term.teacher)
                if target is None:  # not distilled this step (distill_interval)
                    continue
                student, teacher_map, mask = self.aligned(term.module, out, batch, target)
                if self.training:
                    self._count_cellless(name, mask, batch.image_ids)
                value, cosine = term.module(student, teacher_map, mask)
                logs[cosine_log_name(term.log_name)] = float(cosine)
            if not problem and not torch.isfinite(value):
                problem = (
                    f"{term.log_name} is {float(value.detach())}; the step was refused before the optimizer so the "
                    f"weights stay finite. Lower train.lr or the loss weight, or check the inputs of this batch "
                    f"(images {batch.image_ids[:8]}).")
            values[name] = value
            logs[term.log_name] = float(value.detach())
        kinds = {n: self.terms[n].kind for n in values}
        weights = {n: w * (teacher_scale or {}).get(self.terms[n].teacher, 1.0) for n, w in self.weights.items()}
        total = combine(values, kinds, weights, self.alpha, self.beta, self.gamma)
        logs.update(self.group_logs(values, weights))
        # every term finite, their weighted sum not: a weight is too large
        if not problem and not torch.isfinite(total):
            parts = ", ".join(
                f"{self.terms[n].log_name}={logs[self.terms[n].log_name]:.4g} x {weights[n]:g}" for n in values
            )
            problem = (f"the weighted total loss is {float(total.detach())} although every term is finite ({parts}; "
                       f"alpha/beta/gamma {self.alpha:g}/{self.beta:g}/{self.gamma:g}); lower the loss weights.")
        if problem and raise_non_finite:
            raise NonFiniteLossError(problem)
        logs["loss"] = float(total.detach())
        return LossResult(total, logs, problem)

    def _count_cellless(self, name: str, mask: torch.Tensor, image_ids: Sequence[str]) -> None:
        empty = torch.nonzero(mask.flatten(1).sum(1) == 0).flatten().tolist()
        if empty:
            self.cellless.setdefault(name, set()).update(image_ids[j] for j in empty)

    def take_cellless(self) -> Dict[str, List[str]]:
        """Per feature term (every one, active or not): the sorted ids of training images seen since
        the last call whose view had no valid student cell; clears the record."""
        out = {name: sorted(self.cellless.get(name, ())) for name in self.feature_terms(active_only=False)}
        self.cellless = {}
        return out

    def group_logs(self, values: Mapping[str, torch.Tensor],
                   weights: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
        """``loss_task`` / ``loss_kd`` / ``loss_feat``: sum of weight x term of each group present
        this step; ``loss_distill_<teacher>``: beta/gamma x weight x term summed over the teacher's terms.
        ``weights``: this step's (default the configured ones)."""
        group = {"task": self.alpha, "output": self.beta, "feature": self.gamma}
        weights = self.weights if weights is None else weights
        logs: Dict[str, float] = {}
        for name, value in values.items():
            term, part = self.terms[name], weights[name] * float(value.detach())
            key = GROUP_LOGS[term.kind]
            logs[key] = logs.get(key, 0.0) + part
            if term.teacher:
                key = TEACHER_LOG_PREFIX + term.teacher
                logs[key] = logs.get(key, 0.0) + group[term.kind] * part
        return logs

    @torch.no_grad()
    def agreement(self, out: StudentOutput, batch: Batch,
                  targets: Mapping[str, TeacherTargets]) -> Dict[str, Tuple[float, float, float]]:
        """Per feature term (active or not): (sum of cosines, sum of per-cell MSEs, valid cells) between
        the adapted student level and the (standardised) teacher map; sums so batches add up."""
        result: Dict[str, Tuple[float, float, float]] = {}
        for name, module in self.feature_terms(active_only=False).items():
            target = targets.get(module.teacher)
            if target is None:
                continue
            student, teacher_map, mask = self.aligned(module, out, batch, target)
            adapted = module.adapter(student.float())
            cells = float(mask.sum())
            mse = (adapted - teacher_map).pow(2).mean(dim=1, keepdim=True)
            result[name] = (float(masked_cosine(adapted, teacher_map, mask)) * cells, float((mse * mask).sum()), cells)
        return result
