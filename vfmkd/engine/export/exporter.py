"""``tools/export.py``'s work: the trained student (backbone -> neck -> task heads, eval mode) out of
a vfmkd checkpoint into ONNX, TorchScript or an ultralytics ``.pt``.

What is exported is :class:`UnifiedModel` alone: the distillation adapters live in the checkpoint's
``distiller`` entry and are never built here, and the heads run their eval path (ultralytics'
``Detect`` in ``export`` mode: one (B, 4 + num_classes, anchors) tensor of decoded xywh boxes in
input pixels and class probabilities, no raw training dict; its ``Segment`` adds the mask prototypes,
exported as their own output: :func:`export_outputs`). Every graph is checked against PyTorch
before it is renamed into place (:mod:`vfmkd.engine.export.check`), a dynamic one at a second size.

The graph and its outputs are :mod:`vfmkd.engine.export.student_graph`'s; ``--format ultralytics`` is
:mod:`vfmkd.engine.export.ultralytics_layout`. Every file is written atomically
(:func:`vfmkd.engine.export.outputs.atomic_path`), as :func:`vfmkd.utils.checkpoint.save_checkpoint`
writes checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

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
from vfmkd.engine.export.student_graph import INPUT_NAME, ExportedStudent, dynamic_axes, example_input, probe_inputs
from vfmkd.engine.export.ultralytics_layout import export_through_ultralytics, export_ultralytics
from vfmkd.models.input_scale import check_model_input
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.utils.checkpoint import load_checkpoint

FORMATS = ("onnx", "torchscript", "ultralytics", "ultralytics_onnx")
# ultralytics' own choice for torch >= 2.4 (``best_onnx_opset``): opset 18 with the TorchScript-based
# exporter (dynamo=False), the path on which its Detect head exports cleanly.
ONNX_OPSET = 18
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
    if fmt == "ultralytics_onnx":  # ultralytics' own exporter on an ultralytics student
        export_through_ultralytics(model, cfg, names or {}, output, imgsz)
        return {}
    export_ultralytics(model, cfg, names or {}, output, imgsz)
    return {}
