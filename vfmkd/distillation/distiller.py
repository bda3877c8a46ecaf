"""Turns a student forward pass and each teacher's targets into the weighted training loss."""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from vfmkd.core.config import component_kwargs
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import LOSSES
from vfmkd.datasets.cache_codec import dequantize
from vfmkd.distillation.geometry import resample_to_student
from vfmkd.distillation.losses import DetectionLoss, FeatureDistillLoss
from vfmkd.distillation.weighting import combine
from vfmkd.models.unified_model import StudentOutput, UnifiedModel

# Keys of a loss entry that the distiller uses itself instead of passing to the loss.
RESERVED_LOSS_KEYS = ("weight", "log_as")


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf; the message names the component and the step."""


class Distiller(nn.Module):
    """Task losses on the student's heads plus feature distillation against each teacher.

    ``teacher_specs[name]`` lists the maps teacher ``name`` provides (from its cache or the live
    model) and ``teacher_primary[name]`` the one used when a loss names no ``teacher_feature``.
    ``forward(student_out, batch, targets)`` returns ``(total, logs)``, where ``targets[name]``
    holds ``features`` {feature: (B, C, h, w)}, ``affine`` (B, 4), ``valid_hw`` (B, 2),
    ``input_size`` and ``student_affine`` (B, 4) for every teacher distilled in this step (a
    teacher missing from ``targets`` is skipped this step). With per-channel ``stats`` set
    (:meth:`set_teacher_stats`) a teacher's maps are standardised before its adapter and loss.
    Total = ``alpha`` x task + ``beta`` x output-KD + ``gamma`` x feature terms, each term scaled
    by its entry's ``weight``. Logged: ``loss_det``, ``loss_feat_distill_<teacher>``,
    ``cos_<teacher>`` and ``loss``.
    """

    def __init__(
        self,
        model: UnifiedModel,
        losses: Mapping[str, Mapping[str, Any]],
        teacher_specs: Mapping[str, Sequence[FeatureSpec]],
        teacher_primary: Mapping[str, str],
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.weights: Dict[str, float] = {}
        self.kinds: Dict[str, str] = {}
        self.log_names: Dict[str, str] = {}
        self.task_losses: Dict[str, DetectionLoss] = {}
        self.feature_losses = nn.ModuleDict()
        backbone_specs = {s.name: s for s in model.backbone.feature_specs()}
        for name, entry in losses.items():
            where = f"distillation.losses.{name}"
            kind = entry["type"]
            kwargs = component_kwargs(entry, reserved=RESERVED_LOSS_KEYS)
            loss_cls = LOSSES.get(kind)
            self.weights[name] = float(entry.get("weight", 1.0))
            self.kinds[name] = getattr(loss_cls, "kind", "feature")
            if self.kinds[name] == "task":
                head_name = kwargs.pop("head", "detection")
                if head_name not in model.heads:
                    raise ConfigError(f"{where}: the model has no head '{head_name}' (heads: {list(model.heads)})")
                self.task_losses[name] = LOSSES.build(kind, where=where, head=model.heads[head_name], **kwargs)
                default_log = "loss_det" if head_name == "detection" else f"loss_{head_name}"
            elif self.kinds[name] == "feature":
                module = self._build_feature_loss(kind, kwargs, where, backbone_specs, teacher_specs, teacher_primary)
                self.feature_losses[name] = module
                default_log = f"loss_feat_distill_{module.teacher}"
            else:
                raise ConfigError(
                    f"{where}: '{kind}' distils a teacher's output logits (class scores or mask logits), and none of "
                    f"the teachers of this run provides logits for the student's heads; use a feature loss "
                    f"(feature_mse, feature_smooth_l1, feature_cosine, feature_affinity)."
                )
            self.log_names[name] = str(entry.get("log_as") or default_log)
        taken: Dict[str, str] = {}
        for name, log_name in self.log_names.items():
            if log_name in taken:
                raise ConfigError(
                    f"distillation.losses.{taken[log_name]} and .{name} would both log as '{log_name}'; "
                    f"give one of them its own name with log_as: <name>"
                )
            taken[log_name] = name
        self._stats: Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _build_feature_loss(kind, kwargs, where, backbone_specs, teacher_specs, teacher_primary) -> FeatureDistillLoss:
        teacher = kwargs.get("teacher")
        if teacher not in teacher_specs:
            raise ConfigError(
                f"{where}: teacher '{teacher}' is not an enabled teacher of this experiment "
                f"(enabled: {sorted(teacher_specs)}); set 'teacher:' to one of them or enable it under teachers."
            )
        t_specs = {s.name: s for s in teacher_specs[teacher]}
        t_name = kwargs.get("teacher_feature") or teacher_primary[teacher]
        if t_name not in t_specs:
            raise ConfigError(f"{where}: teacher '{teacher}' provides {sorted(t_specs)}, not '{t_name}'")
        level = kwargs.get("student_level") or _closest_stride_level(backbone_specs, t_specs[t_name].stride)
        if level not in backbone_specs:
            raise ConfigError(f"{where}: the student backbone has levels {sorted(backbone_specs)}, not '{level}'")
        kwargs.update(
            teacher_feature=t_name,
            student_level=level,
            student_channels=backbone_specs[level].channels,
            teacher_channels=t_specs[t_name].channels,
        )
        return LOSSES.build(kind, where=where, **kwargs)

    def teachers_used(self) -> Tuple[str, ...]:
        return tuple(sorted({m.teacher for m in self.feature_losses.values()}))

    def features_used(self, teacher: str) -> Tuple[str, ...]:
        return tuple(sorted({m.teacher_feature for m in self.feature_losses.values() if m.teacher == teacher}))

    def set_teacher_stats(self, teacher: str, feature: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise ``teacher``'s ``feature`` maps as (x - mean) / std per channel from now on."""
        self._stats[(teacher, feature)] = (mean.float().view(1, -1, 1, 1), std.float().clamp_min(1e-6).view(1, -1, 1, 1))

    def _teacher_map(self, teacher: str, feature: str, target: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        fmap = target["features"][feature]
        if isinstance(fmap, dict):  # int8 cache: dequantised here, on the training device
            fmap = dequantize(*(fmap[k].to(device, non_blocking=True) for k in ("values", "scale", "channel_scale")))
        fmap = fmap.to(device, non_blocking=True).float()
        stats = self._stats.get((teacher, feature))
        if stats is not None:
            mean, std = stats
            fmap = (fmap - mean.to(device)) / std.to(device)
        return fmap

    def forward(
        self, out: StudentOutput, batch: Mapping[str, Any], targets: Optional[Mapping[str, Mapping[str, Any]]] = None
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        targets = batch.get("teachers", {}) if targets is None else targets
        logs: Dict[str, float] = {}
        terms: Dict[str, torch.Tensor] = {}
        for name, loss_fn in self.task_losses.items():
            value, items = loss_fn(out.heads[loss_fn.head_name], batch)
            terms[name] = value
            logs.update({f"{self.log_names[name]}_{k}": float(v) for k, v in items.items()})
        for name, module in self.feature_losses.items():
            target = targets.get(module.teacher)
            if target is None:  # not distilled this step (distill_interval)
                continue
            student = out.backbone[module.student_level]
            stride = batch["images"].shape[-1] // student.shape[-1]
            teacher_map, mask = resample_to_student(
                self._teacher_map(module.teacher, module.teacher_feature, target, student.device),
                target["affine"],
                target["valid_hw"],
                (int(target["input_size"]), int(target["input_size"])),
                target.get("student_affine", batch["affine"]),
                tuple(student.shape[-2:]),
                stride,
            )
            if _is_summary(target["features"][module.teacher_feature]):
                # A 1x1 summary (e.g. DINO's CLS token) is matched by the student level pooled
                # over the image region, not cell by cell.
                student = (student * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp_min(1.0)
                teacher_map, mask = teacher_map.mean((2, 3), keepdim=True), torch.ones_like(mask[..., :1, :1])
            value, cosine = module(student, teacher_map, mask)
            terms[name] = value
            logs[self.log_names[name].replace("loss_feat_distill_", "cos_", 1)] = float(cosine)
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise NonFiniteLossError(
                    f"{self.log_names[name]} is {float(value.detach())}; training stopped before the optimizer step "
                    f"so the weights stay finite. Lower train.lr or the loss weight, or check the inputs of this "
                    f"batch (images {list(batch.get('image_ids', []))[:8]})."
                )
            logs[self.log_names[name]] = float(value.detach())
        total = combine(terms, self.kinds, self.weights, self.alpha, self.beta, self.gamma)
        logs["loss"] = float(total.detach())
        return total, logs


def _is_summary(fmap: Any) -> bool:
    """A (B, C, 1, 1) map (or its int8 form) summarises the whole image."""
    values = fmap["values"] if isinstance(fmap, dict) else fmap
    return tuple(values.shape[-2:]) == (1, 1)


def _closest_stride_level(backbone_specs: Mapping[str, FeatureSpec], stride: int) -> str:
    return min(backbone_specs.values(), key=lambda s: abs(math.log2(s.stride) - math.log2(stride))).name
