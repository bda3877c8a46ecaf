"""What an export holds: the student's eval graph (:class:`ExportedStudent`: backbone -> neck -> task
heads, no distiller), its outputs in order (:func:`export_outputs`) and the inputs an export is traced
and checked on (:func:`example_input`, :func:`probe_inputs`, the sizes a dynamic graph takes)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from vfmkd.core.errors import ConfigError
from vfmkd.models.input_scale import check_model_input
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.tasks import InstanceOutput, task_of

INPUT_NAME = "images"


@dataclass(frozen=True)
class ExportOutput:
    """One output of the exported graph: its ``name``, the ``head`` it comes from and its ``kind``:
    ``predictions`` (the head's eval tensor), ``set`` (a set-prediction head's queries), ``proto``
    (an instance head's mask prototypes, (B, nm, S/4, S/4), right after its predictions) or ``part``
    (one field of a head whose task's output type names ``export_parts``: a query panoptic head's
    class logits, mask logits and IoU; ``part`` is the field)."""

    name: str
    head: str
    kind: str
    part: str = ""


def export_outputs(model: UnifiedModel) -> List[ExportOutput]:
    """The graph's outputs in order: per head (config order) its eval prediction, then an instance
    head's prototypes. A one-head student keeps ultralytics' names (``output0``, and ``output1`` for a
    segmentation head's prototypes, as ultralytics' own seg exports); with several heads each output is
    ``output_<head>`` and prototypes ``proto_<head>``."""
    parts = []
    for name, head in model.heads.items():
        fields = getattr(task_of(head).output_type, "export_parts", ())
        if fields:  # a record of several tensors (a query panoptic head): one output per field
            parts.extend((name, "part", f) for f in fields)
            continue
        parts.append((name, "set" if getattr(head, "set_prediction", False) else "predictions", ""))
        if issubclass(task_of(head).output_type, InstanceOutput):  # its eval output carries mask prototypes
            parts.append((name, "proto", ""))
    if len(model.heads) == 1:
        return [ExportOutput(f"output{i}", h, k, f) for i, (h, k, f) in enumerate(parts)]
    return [ExportOutput(f"{f or ('proto' if k == 'proto' else 'output')}_{h}", h, k, f) for h, k, f in parts]


class ExportedStudent(nn.Module):
    """The student as a deployable graph: ``forward((B, 3, H, W) float in [0, 1])`` returns the outputs
    of :func:`export_outputs` in that order (one tensor when there is one, else a tuple): each head's
    eval output, plus an instance head's prototypes. Backbone features and neck maps are not
    outputs; nothing of the distiller is inside."""

    def __init__(self, model: UnifiedModel, dynamic: bool = False, fmt: str = "onnx") -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()  # the export flags below stay off the caller's model
        self.head_names = list(model.heads)
        self.outputs = export_outputs(model)
        self.proto_heads = {o.head for o in self.outputs if o.kind == "proto"}
        self.part_fields = {o.head: [p.part for p in self.outputs if p.head == o.head] for o in self.outputs
                            if o.kind == "part"}
        self.readers = {name: task_of(head).read_output for name, head in model.heads.items()}
        for m in self.model.modules():
            # ultralytics' Exporter does the same to its Detect heads: return the decoded tensor alone
            # (a Segment: (decoded, prototypes)) and, for dynamic shapes, rebuild the anchor grid in the
            # graph instead of baking it in.
            if hasattr(m, "export") and hasattr(m, "format") and hasattr(m, "dynamic"):
                m.export, m.format, m.dynamic = True, fmt, dynamic
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def output_names(self) -> List[str]:
        return [o.name for o in self.outputs]

    def forward(self, x: torch.Tensor):
        fused = self.model.neck(self.model.backbone(self.model.prepare_input(x)))  # DSRL: downscaled input
        outs = []
        for name in self.head_names:
            y = self.model.heads[name](fused)
            if name in self.proto_heads:
                ys = list(y[:2])  # ultralytics' Segment in export mode: (decoded, prototypes)
            elif name in self.part_fields:  # the fields of its task's output record, in export_parts' order
                record = self.readers[name](y)
                ys = [getattr(record, f) for f in self.part_fields[name]]
            else:
                ys = [y[0] if isinstance(y, (tuple, list)) else y]  # vfmkd heads' eval: (predictions, raw dict)
            for t in ys:
                if not isinstance(t, torch.Tensor):
                    raise ConfigError(f"head '{name}' returns a {type(t).__name__} in eval mode; export needs tensors")
            outs.extend(ys)
        return outs[0] if len(outs) == 1 else tuple(outs)


def example_input(imgsz: int, batch: int = 1, seed: int = 0, width: Optional[int] = None) -> torch.Tensor:
    return torch.rand(batch, 3, imgsz, width or imgsz, generator=torch.Generator().manual_seed(seed))


def second_size(model: UnifiedModel, imgsz: int) -> int:
    """The next input size above ``imgsz`` the student takes (:func:`check_model_input`): a dynamic
    export is checked there too, so a size frozen into the graph is caught."""
    for n in range(imgsz + 1, 4 * imgsz + 1):
        try:
            check_model_input(model, n, "", "")
        except ConfigError:
            continue
        return n
    raise ConfigError(f"no input size between {imgsz} and {4 * imgsz} fits the student")


def size_multiple(model: UnifiedModel) -> int:
    """The smallest input side the student takes (:func:`check_model_input`): a dynamic export takes every
    multiple of it (32 for a stride-32 student, 48 under DSRL at sr_target_scale 1.5) and no other size."""
    for n in range(1, 4097):
        try:
            check_model_input(model, n, "", "")
        except ConfigError:
            continue
        return n
    raise ConfigError("no input size up to 4096 fits the student")


def probe_inputs(model: UnifiedModel, imgsz: int, dynamic: bool) -> List[torch.Tensor]:
    """The inputs an export is checked on: one image at ``imgsz`` (two with ``dynamic``), and with
    ``dynamic`` one more at (:func:`second_size`, ``imgsz``)."""
    probes = [example_input(imgsz, batch=2 if dynamic else 1, seed=1)]
    if dynamic:
        probes.append(example_input(second_size(model, imgsz), seed=2, width=imgsz))
    return probes


def dynamic_axes(outputs: Sequence[ExportOutput], example: Sequence[torch.Tensor]) -> Dict[str, Dict[int, str]]:
    """Free batch, height and width of the input; free batch and anchors (or grid height and width)
    of each output."""
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    for o, t in zip(outputs, example):
        if o.kind == "part":  # per-query fields: (B, Q[, C]) fixed but the batch, masks (B, Q, h, w) free in h, w
            axes[o.name] = {0: "batch", **({2: f"{o.name}_height", 3: f"{o.name}_width"} if t.dim() == 4 else {})}
            continue
        axes[o.name] = {0: "batch", 2: f"{o.name}_anchors"} if t.dim() == 3 else \
            {0: "batch", 2: f"{o.name}_height", 3: f"{o.name}_width"}
    return axes
