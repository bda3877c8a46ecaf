"""``tools/export.py``'s work: the trained student (backbone -> neck -> task heads, eval mode) out of
a vfmkd checkpoint into ONNX, TorchScript or an ultralytics ``.pt``.

What is exported is :class:`UnifiedModel` alone: the distillation adapters live in the checkpoint's
``distiller`` entry and are never built here, and the heads run their eval path (ultralytics'
``Detect`` in ``export`` mode: one (B, 4 + num_classes, anchors) tensor of decoded xywh boxes in
input pixels and class probabilities, no raw training dict; its ``Segment`` adds the mask prototypes,
exported as their own output: :func:`export_outputs`). Every graph is checked against PyTorch
before it is renamed into place (:mod:`vfmkd.engine.export.check`), a dynamic one at a second size.

Every file is written atomically (:func:`vfmkd.engine.export.outputs.atomic_path`), as
:func:`vfmkd.utils.checkpoint.save_checkpoint` writes checkpoints.
"""
from __future__ import annotations

import copy
import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from vfmkd.core.config import experiment_record
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.engine.builders import build_model
from vfmkd.engine.export.check import (  # noqa: F401
    ExportMismatchError,
    compare_outputs,
    matched_query_difference,
    onnx_session,
)
from vfmkd.engine.export.outputs import SUFFIXES, atomic_path, default_output  # noqa: F401
from vfmkd.models.input_scale import check_model_input
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.tasks import InstanceOutput, task_of
from vfmkd.utils.checkpoint import load_checkpoint

FORMATS = ("onnx", "torchscript", "ultralytics")
# ultralytics' own choice for torch >= 2.4 (``best_onnx_opset``): opset 18 with the TorchScript-based
# exporter (dynamo=False), the path on which its Detect head exports cleanly.
ONNX_OPSET = 18
INPUT_NAME = "images"
# ONNX Runtime vs PyTorch: class probabilities absolutely, boxes in units of the input size (they are
# pixels, up to ~500 at 640, where one float32 step is 6e-5 px).
ONNX_TOLERANCE = 1e-4


def non_finite_key(state: Any, prefix: str = "") -> Optional[str]:
    """The first key path of ``state`` holding a NaN/inf floating tensor, or None."""
    if isinstance(state, torch.Tensor):
        return (prefix or "<tensor>") if state.is_floating_point() and not torch.isfinite(state).all() else None
    items = (
        state.items() if isinstance(state, Mapping) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    )
    for k, v in items:
        found = non_finite_key(v, f"{prefix}.{k}" if prefix else str(k))
        if found:
            return found
    return None


def load_student(checkpoint: Path, cfg: Dict[str, Any], config_name: str) -> UnifiedModel:
    """The checkpoint's student built from ``cfg``'s model section, weights loaded, in eval mode on
    CPU. Refuses a file that is not a vfmkd training checkpoint, weights that do not fit the config,
    and NaN/inf weights (CheckpointError)."""
    state = load_checkpoint(checkpoint)
    if "model" not in state or not isinstance(state["model"], Mapping):
        raise CheckpointError(f"{checkpoint} is not a vfmkd training checkpoint (no 'model' entry); "
                              "pass checkpoints/best.pt or last.pt of a run")
    bad = non_finite_key(state["model"])
    if bad:
        raise CheckpointError(f"refusing to export {checkpoint}: its student weights hold NaN/inf values ({bad}); "
                              "export an earlier finite checkpoint (checkpoints/best.pt) or retrain")
    model = build_model(experiment_record(cfg).model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint} does not fit the model of {config_name} (another backbone, variant or num_classes? "
            f"pass the run's own config.yaml): {str(exc).splitlines()[0]}") from exc
    return model.eval()


@dataclass(frozen=True)
class ExportOutput:
    """One output of the exported graph: its ``name``, the ``head`` it comes from and its ``kind``:
    ``predictions`` (the head's eval tensor), ``set`` (a set-prediction head's queries) or ``proto``
    (an instance head's mask prototypes, (B, nm, S/4, S/4), right after its predictions)."""

    name: str
    head: str
    kind: str


def export_outputs(model: UnifiedModel) -> List[ExportOutput]:
    """The graph's outputs in order: per head (config order) its eval prediction, then an instance
    head's prototypes. A one-head student keeps ultralytics' names (``output0``, and ``output1`` for a
    segmentation head's prototypes, as ultralytics' own seg exports); with several heads each output is
    ``output_<head>`` and prototypes ``proto_<head>``."""
    parts = []
    for name, head in model.heads.items():
        parts.append((name, "set" if getattr(head, "set_prediction", False) else "predictions"))
        if issubclass(task_of(head).output_type, InstanceOutput):  # its eval output carries mask prototypes
            parts.append((name, "proto"))
    if len(model.heads) == 1:
        return [ExportOutput(f"output{i}", h, k) for i, (h, k) in enumerate(parts)]
    return [ExportOutput(f"{'proto' if k == 'proto' else 'output'}_{h}", h, k) for h, k in parts]


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
        axes[o.name] = {0: "batch", 2: f"{o.name}_anchors"} if t.dim() == 3 else \
            {0: "batch", 2: f"{o.name}_height", 3: f"{o.name}_width"}
    return axes


def _as_list(out: Any) -> List[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def worst_over_probes(
    compare: Callable[[torch.Tensor], Dict[str, float]], probes: Sequence[torch.Tensor]
) -> Dict[str, float]:
    """The largest of each difference ``compare(images)`` reports over ``probes``."""
    diff: Dict[str, float] = {}
    for images in probes:
        for k, v in compare(images).items():
            diff[k] = max(diff.get(k, 0.0), v)
    return diff


def compare_student(model: UnifiedModel, got: Sequence[np.ndarray], images: torch.Tensor) -> Dict[str, float]:
    """:func:`compare_outputs` of an exported graph's outputs on ``images`` against the PyTorch student."""
    reference = ExportedStudent(model, dynamic=True)
    with torch.no_grad():
        want = _as_list(reference(images))
    return compare_outputs(got, want, [o.kind for o in reference.outputs], images)


def compare_onnx(model: UnifiedModel, path: Path, images: torch.Tensor) -> Dict[str, float]:
    """|ONNX Runtime - PyTorch| of the student on ``images`` (:func:`compare_outputs`)."""
    return compare_student(model, onnx_session(path).run(None, {INPUT_NAME: images.numpy()}), images)


def _mismatch(model: UnifiedModel, diff: Dict[str, float], tolerance: float, path: Path,
              what: str) -> ExportMismatchError:
    hint = ""
    if any(getattr(h, "set_prediction", False) for h in model.heads.values()):
        hint = (" RT-DETR picks its queries by the top-k encoder scores: when many scores are equal (an "
                "untrained or barely trained head) ONNX Runtime and PyTorch pick different queries; export a "
                "trained checkpoint.")
    return ExportMismatchError(f"{what} differs from PyTorch by {diff['max_scaled']:.2e} (> {tolerance:.0e}; "
                               f"boxes in units of the input size): {diff}; nothing written to {path}.{hint}")


def export_onnx(model: UnifiedModel, path: Path, imgsz: int, dynamic: bool = False, opset: int = ONNX_OPSET,
                tolerance: Optional[float] = ONNX_TOLERANCE) -> Dict[str, float]:
    """ONNX graph of the student, input ``images`` (B, 3, imgsz, imgsz), outputs named as
    :func:`export_outputs`; with ``dynamic`` the batch, height and width are free. Before the rename it
    passes ``onnx.checker`` and, unless ``tolerance`` is None, ONNX Runtime reproduces PyTorch on the
    probes of :func:`probe_inputs` (a second size when dynamic) within it (:func:`compare_outputs`'s
    ``max_scaled``; else ExportMismatchError and no file). Returns the diffs."""
    import onnx  # optional at import time of vfmkd: only the export needs it

    wrapped = ExportedStudent(model, dynamic=dynamic, fmt="onnx")
    axes = None
    if dynamic:  # output ranks from a copy: a run of ``wrapped`` itself would fill its heads' caches before tracing
        with torch.no_grad():
            axes = dynamic_axes(wrapped.outputs, _as_list(ExportedStudent(model, dynamic=True)(example_input(imgsz))))
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(wrapped, (example_input(imgsz),), str(tmp), opset_version=opset, input_names=[INPUT_NAME],
                          output_names=wrapped.output_names, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(onnx.load(str(tmp)))
        diff = worst_over_probes(lambda images: compare_onnx(model, tmp, images), probe_inputs(model, imgsz, dynamic))
        if tolerance is not None and diff["max_scaled"] > tolerance:
            raise _mismatch(model, diff, tolerance, path, "ONNX Runtime")
    return diff


def export_torchscript(model: UnifiedModel, path: Path, imgsz: int, dynamic: bool = False,
                       tolerance: Optional[float] = ONNX_TOLERANCE) -> Dict[str, float]:
    """A traced TorchScript module: ``torch.jit.load(path)(images)`` returns the outputs of
    :func:`export_outputs` in that order (a tensor when there is one; the names are in the file as
    ``output_names.json``); with ``dynamic`` the anchor grid is computed in the graph, so other input
    sizes and batch sizes work. Checked against PyTorch on :func:`probe_inputs` before the rename."""
    wrapped = ExportedStudent(model, dynamic=dynamic, fmt="torchscript")
    with atomic_path(path) as tmp, torch.no_grad():
        traced = torch.jit.trace(wrapped, (example_input(imgsz),), strict=False, check_trace=False)
        diff = worst_over_probes(lambda images: compare_student(model, [t.numpy() for t in _as_list(traced(images))],
                                                                images), probe_inputs(model, imgsz, dynamic))
        if tolerance is not None and diff["max_scaled"] > tolerance:
            raise _mismatch(model, diff, tolerance, path, "The traced TorchScript module")
        with open(tmp, "wb") as f:
            torch.jit.save(traced, f, _extra_files={"output_names.json": json.dumps(wrapped.output_names)})
    return diff


# --------------------------------------------------------------------------- ultralytics checkpoint
# vfmkd's YOLOv8 student is ultralytics' yolov8.yaml network module for module; its modules map onto
# DetectionModel.model[i] (the yaml's layer index). Layers 10/13 (Upsample) and 11/14/17/20 (Concat)
# hold no weights.
ULTRALYTICS_LAYERS: Dict[str, int] = {
    "backbone.stem.0": 0, "backbone.stem.1": 1, "backbone.stem.2": 2,
    "backbone.stage3.0": 3, "backbone.stage3.1": 4, "backbone.stage4.0": 5, "backbone.stage4.1": 6,
    "backbone.stage5.0": 7, "backbone.stage5.1": 8, "backbone.stage5.2": 9,
    "neck.td4": 12, "neck.td3": 15, "neck.down3": 16, "neck.bu4": 18, "neck.down4": 19, "neck.bu5": 21,
    "heads.detection.detect": 22,
}


def ultralytics_key(key: str) -> str:
    for prefix, index in ULTRALYTICS_LAYERS.items():
        if key.startswith(prefix + "."):
            return f"model.{index}.{key[len(prefix) + 1:]}"
    raise ConfigError(f"no ultralytics layer for the vfmkd weight '{key}'")


def ultralytics_layout_problem(cfg: Dict[str, Any]) -> Optional[str]:
    """Why the student is not ultralytics' yolov8{variant}.yaml network, or None when it is."""
    from vfmkd.models.backbones.yolov8 import resolve_variant, yolo_repeats

    m = experiment_record(cfg).model
    bb, neck, heads = dict(m.backbone), dict(m.neck), dict(m.heads)
    if bb.get("type") != "yolov8":
        return f"the backbone is '{bb.get('type')}', not yolov8"
    if int(bb.get("in_channels", 3)) != 3:
        return "the backbone takes in_channels != 3"
    if neck.get("type") != "yolov8_pafpn":
        return f"the neck is '{neck.get('type')}', not yolov8_pafpn"
    variant = str(bb.get("variant", "n"))
    want_depth = yolo_repeats(3, resolve_variant(variant))
    if int(neck.get("depth", 1)) != want_depth:
        return f"neck depth {neck.get('depth', 1)} differs from yolov8{variant}.yaml's head ({want_depth})"
    if list(heads) != ["detection"] or heads["detection"].get("type") != "yolo_head":
        return f"the heads are {sorted(heads)}, not a single yolo_head named detection"
    if int(heads["detection"].get("reg_max", 16)) != 16:
        return "the head's reg_max differs from yolov8.yaml's 16"
    return None


def to_ultralytics(model: UnifiedModel, cfg: Dict[str, Any], names: Mapping[int, str]):
    """ultralytics' DetectionModel built from its own yolov8{variant}.yaml with the student's weights
    mapped in. Every key and shape must match both ways and the two networks must give the same
    eval output on a probe input, otherwise ConfigError (no approximate conversion)."""
    from ultralytics.nn.modules import Conv
    from ultralytics.nn.tasks import DetectionModel

    problem = ultralytics_layout_problem(cfg)
    if problem:
        raise ConfigError(
            f"--format ultralytics needs a YOLOv8 student laid out as ultralytics' yolov8.yaml: {problem}"
        )
    m = experiment_record(cfg).model
    variant = str(dict(m.backbone).get("variant", "n"))
    nc = int(dict(m.heads)["detection"].get("num_classes", 80))
    um = DetectionModel(f"yolov8{variant}.yaml", ch=3, nc=nc, verbose=False)
    ours = {ultralytics_key(k): v for k, v in model.state_dict().items()}
    theirs = um.state_dict()
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    shapes = [k for k in theirs.keys() & ours.keys() if theirs[k].shape != ours[k].shape]
    if missing or extra or shapes:
        raise ConfigError(f"the student's weights do not map onto ultralytics' yolov8{variant}.yaml: missing "
                          f"{missing[:5]}, unexpected {extra[:5]}, shape mismatches {sorted(shapes)[:5]}")
    um.load_state_dict(ours, strict=True)
    # Two settings live outside the state_dict and differ between the networks as built, so they are
    # carried over module by module: ultralytics' initialize_weights sets BatchNorm eps=1e-3 where vfmkd
    # keeps torch's 1e-5, and ultralytics (8.4) builds SPPF.cv1 without activation when constructed
    # directly (vfmkd's backbone does this) but re-adds SiLU for yolov8.yaml rows.
    modules = dict(um.named_modules())
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.modules.batchnorm._BatchNorm, Conv)):
            continue
        target = modules[ultralytics_key(name + ".x")[:-2]]
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            target.eps, target.momentum = mod.eps, mod.momentum
        elif isinstance(mod, Conv) and type(mod.act) is not type(target.act):
            target.act = copy.deepcopy(mod.act)
    um.eval()
    probe = example_input(128, batch=2, seed=1)
    with torch.no_grad():
        want = ExportedStudent(model, dynamic=True)(probe)
        got = um(probe)[0]
    diff = float((got - want).abs().max())
    if diff > 1e-4:
        raise ConfigError(f"ultralytics' yolov8{variant} with the student's weights differs from the student by "
                          f"{diff:.2e}")
    um.names = {int(k): str(v) for k, v in names.items()}
    for p in um.parameters():
        p.requires_grad_(False)
    return um


def export_ultralytics(model: UnifiedModel, cfg: Dict[str, Any], names: Mapping[int, str], path: Path,
                       imgsz: int) -> Path:
    """An ultralytics checkpoint (``ultralytics.YOLO(path)`` predicts and validates with it). Like
    ultralytics' own ``.pt`` files it pickles the ``DetectionModel`` (ultralytics loads it with
    ``weights_only=False``; vfmkd never loads it). Kept in float32 so its boxes equal vfmkd's."""
    import ultralytics

    um = to_ultralytics(model, cfg, names)
    variant = dict(experiment_record(cfg).model.backbone).get("variant", "n")
    ckpt = {
        "date": datetime.datetime.now().isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": um,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": {"task": "detect", "imgsz": int(imgsz), "model": f"yolov8{variant}.yaml",
                       "note": "exported from a vfmkd checkpoint by tools/export.py"},
        "train_metrics": None,
        "train_results": None,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)  # a file object: the archive's inner folder is "archive", not the temp name
    return path


def export_student(model: UnifiedModel, cfg: Dict[str, Any], fmt: str, output: Path, imgsz: int,
                   dynamic: bool = False, names: Optional[Mapping[int, str]] = None) -> Dict[str, float]:
    """Write ``output``; returns the exported graph's differences from PyTorch (onnx, torchscript), else {}."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; choose from {', '.join(FORMATS)}")
    check_model_input(model, imgsz, "export", "--imgsz")
    if fmt == "onnx":
        return export_onnx(model, output, imgsz, dynamic)
    if fmt == "torchscript":
        return export_torchscript(model, output, imgsz, dynamic)
    export_ultralytics(model, cfg, names or {}, output, imgsz)
    return {}
