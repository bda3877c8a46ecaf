"""Turns a student forward pass and a batch's teacher features into the weighted training loss."""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Sequence, Tuple

import torch
from torch import nn

from vfmkd.core.config import component_kwargs
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.geometry import resample_to_student
from vfmkd.distillation.losses import DetectionLoss, FeatureDistillLoss
from vfmkd.models.unified_model import StudentOutput, UnifiedModel

RESERVED_LOSS_KEYS = ("weight",)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf; the message names the component and the step."""


class Distiller(nn.Module):
    """Task losses on the student's heads plus feature distillation against each teacher.

    ``teacher_specs[name]`` lists the maps teacher ``name`` provides (from its cache or the live
    model) and ``teacher_primary[name]`` the one used when a loss names no ``teacher_feature``.
    ``forward(student_out, batch)`` returns ``(total, logs)``; ``batch["teachers"][name]`` holds
    ``features`` {feature: (B, C, h, w)}, ``affine`` (B, 4), ``valid_hw`` (B, 2), ``input_size``.
    Logged: ``loss_det``, ``loss_feat_distill_<teacher>``, ``cos_<teacher>`` and ``loss``.
    """

    def __init__(
        self,
        model: UnifiedModel,
        losses: Mapping[str, Mapping[str, Any]],
        teacher_specs: Mapping[str, Sequence[FeatureSpec]],
        teacher_primary: Mapping[str, str],
    ) -> None:
        super().__init__()
        self.weights: Dict[str, float] = {}
        self.task_losses: Dict[str, DetectionLoss] = {}
        self.feature_losses = nn.ModuleDict()
        self.log_names: Dict[str, str] = {}
        backbone_specs = {s.name: s for s in model.backbone.feature_specs()}
        for name, entry in losses.items():
            where = f"distillation.losses.{name}"
            kind = entry["type"]
            kwargs = component_kwargs(entry, reserved=RESERVED_LOSS_KEYS)
            self.weights[name] = float(entry.get("weight", 1.0))
            loss_cls = LOSSES.get(kind)
            if getattr(loss_cls, "kind", None) == "task":
                head_name = kwargs.pop("head", "detection")
                if head_name not in model.heads:
                    raise ConfigError(f"{where}: the model has no head '{head_name}' (heads: {list(model.heads)})")
                self.task_losses[name] = LOSSES.build(kind, where=where, head=model.heads[head_name], **kwargs)
                self.log_names[name] = "loss_det" if head_name == "detection" else f"loss_{head_name}"
            else:
                module = self._build_feature_loss(kind, kwargs, where, backbone_specs, teacher_specs, teacher_primary)
                self.feature_losses[name] = module
                self.log_names[name] = f"loss_feat_distill_{module.teacher}"
        dupes = {v for v in self.log_names.values() if list(self.log_names.values()).count(v) > 1}
        if dupes:
            raise ConfigError(f"distillation.losses: several losses would log as {sorted(dupes)}; give each teacher one feature loss")

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

    def forward(self, out: StudentOutput, batch: Mapping[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        total = torch.zeros((), device=batch["images"].device)
        logs: Dict[str, float] = {}
        terms: Dict[str, torch.Tensor] = {}
        for name, loss_fn in self.task_losses.items():
            value, items = loss_fn(out.heads[loss_fn.head_name], batch)
            terms[self.log_names[name]] = value
            logs.update({f"{self.log_names[name]}_{k}": float(v) for k, v in items.items()})
        for name, module in self.feature_losses.items():
            student = out.backbone[module.student_level]
            target = batch["teachers"][module.teacher]
            stride = batch["images"].shape[-1] // student.shape[-1]
            teacher_map, mask = resample_to_student(
                target["features"][module.teacher_feature].to(student.device),
                target["affine"],
                target["valid_hw"],
                (int(target["input_size"]), int(target["input_size"])),
                batch["affine"],
                tuple(student.shape[-2:]),
                stride,
            )
            value, cosine = module(student, teacher_map, mask)
            terms[self.log_names[name]] = value
            logs[f"cos_{module.teacher}"] = float(cosine)
        for name, log_name in self.log_names.items():
            value = terms[log_name]
            if not torch.isfinite(value):
                raise NonFiniteLossError(
                    f"{log_name} is {float(value.detach())}; training stopped before the optimizer step so the weights "
                    f"stay finite. Lower train.lr or the loss weight, or check the inputs of this batch "
                    f"(images {list(batch.get('image_ids', []))[:8]})."
                )
            total = total + self.weights[name] * value
            logs[log_name] = float(value.detach())
        logs["loss"] = float(total.detach())
        return total, logs


def _closest_stride_level(backbone_specs: Mapping[str, FeatureSpec], stride: int) -> str:
    return min(backbone_specs.values(), key=lambda s: abs(math.log2(s.stride) - math.log2(stride))).name
