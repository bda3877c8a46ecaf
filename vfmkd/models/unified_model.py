"""Student = backbone -> neck -> task heads, each built from config through its registry."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import AbstractSet, Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

# Importing the packages registers the built-in components.
import vfmkd.models.backbones  # noqa: F401,E402
import vfmkd.models.heads  # noqa: F401,E402
import vfmkd.models.necks  # noqa: F401,E402
from vfmkd.core.config import component_kwargs
from vfmkd.core.registry import BACKBONES, HEADS, NECKS
from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.input_scale import configured_input_scale, downscale_input, training_input_scale
from vfmkd.models.ultralytics_student import complete_ultralytics_section  # registers the ultralytics student


@dataclass
class StudentOutput:
    """``backbone``/``neck``: level name -> (B, C, H/stride, W/stride); ``heads``: head name -> raw output.
    ``low``: the low-resolution path's output of the same step (dual-path resolution distillation,
    training only: the student on the input / sr_target_scale, its segmentation heads), else None."""

    backbone: Dict[str, torch.Tensor]
    neck: Dict[str, torch.Tensor]
    heads: Dict[str, Any]
    low: Optional[StudentOutput] = None


class UnifiedModel(nn.Module):
    """The student network. Distillation reads ``backbone`` features; task losses read ``heads``."""

    def __init__(self, backbone: BaseBackbone, neck: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.heads = nn.ModuleDict(dict(heads))

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], input_scale: Optional[float] = None,
                    canvas_heads: Optional[AbstractSet[str]] = None, training: bool = False) -> UnifiedModel:
        """Build from the resolved ``model`` section of an experiment, a mapping (the engine's
        ``build_model`` hands a ``ModelConfig`` over as one: ``dataclasses.asdict``).
        ``input_scale`` defaults to the section's own: with ``training`` the trained path's
        (:func:`training_input_scale`: single-path DSRL's ``sr_target_scale``, else 1), otherwise the
        inference path's (:func:`configured_input_scale`: 1 / ``model.infer_scale`` when set). Above 1 the
        student sees its canvas downsized by that factor, and the heads named in ``canvas_heads`` (those
        whose task answers in canvas pixels: boxes, prototypes; ``vfmkd.tasks.canvas_stride_heads`` names
        them) are built with the levels' strides in canvas pixels, so their anchors, boxes and losses stay
        in the canvas frame. At scale 1 the two frames are one and ``canvas_heads`` may be left out."""
        if input_scale is None:
            input_scale = training_input_scale(model_cfg) if training else configured_input_scale(model_cfg)
        if canvas_heads is None and input_scale != 1:
            raise ValueError(f"input scale {input_scale}: name the heads that answer in canvas pixels (canvas_heads="
                             f"vfmkd.tasks.canvas_stride_heads(...)); the engine's build_model does")
        if not isinstance(model_cfg, Mapping):
            raise TypeError(f"UnifiedModel.from_config takes the model section as a mapping, got "
                            f"{type(model_cfg).__name__} (a ModelConfig: dataclasses.asdict(model) or build_model)")
        model_cfg = complete_ultralytics_section(model_cfg)  # neck/heads an ultralytics student implies
        bb = model_cfg["backbone"]
        backbone = BACKBONES.build(bb["type"], where="model.backbone", **component_kwargs(bb))
        nk = model_cfg["neck"]
        neck = NECKS.build(nk["type"], where="model.neck", in_specs=backbone.feature_specs(), **component_kwargs(nk))
        neck_specs = neck.feature_specs()
        # The head is sized from what the neck declares; check the declaration is honest once.
        _check_declared(neck_specs, [s.channels for s in backbone.feature_specs()], "neck")
        canvas_specs = [replace(s, stride=s.stride * input_scale) for s in neck_specs]
        heads = {
            name: HEADS.build(h["type"], where=f"model.heads.{name}", **component_kwargs(h),
                              in_specs=canvas_specs if name in (canvas_heads or ()) else neck_specs)
            for name, h in model_cfg["heads"].items()
        }
        model = cls(backbone, neck, heads)
        model.input_scale = float(input_scale)
        return model

    #: The input is resized to 1/input_scale of its size inside forward (single-path DSRL's low-resolution
    #: student, or model.infer_scale; set by from_config), so evaluation and export see the same input.
    input_scale: float = 1.0
    #: What ``model.init`` loaded (vfmkd.models.pretrained.InitReport), set by the engine's build_model.
    init_report: Optional[Any] = None

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return downscale_input(x, self.input_scale)

    def forward(self, x: torch.Tensor, heads: Optional[Sequence[str]] = None) -> StudentOutput:
        """(B, 3, H, W) -> :class:`StudentOutput`; ``heads``: run only these heads (default: all)."""
        feats = self.backbone(self.prepare_input(x))
        fused = self.neck(feats)
        names = self.heads.keys() if heads is None else heads
        return StudentOutput(feats, fused, {name: self.heads[name](fused) for name in names})


def _check_declared(specs, in_channels, what: str) -> None:
    if len(specs) != len(in_channels):
        raise ValueError(f"{what} declares {len(specs)} levels for {len(in_channels)} inputs")
