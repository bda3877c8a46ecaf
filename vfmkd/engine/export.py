"""``tools/export.py``'s work: the trained student (backbone -> neck -> task heads, eval mode) out of
a vfmkd checkpoint into ONNX, TorchScript or an ultralytics ``.pt``.

What is exported is :class:`UnifiedModel` alone: the distillation adapters live in the checkpoint's
``distiller`` entry and are never built here, and the heads run their eval path (ultralytics'
``Detect`` in ``export`` mode: one (B, 4 + num_classes, anchors) tensor of decoded xywh boxes in
input pixels and class probabilities, no raw training dict).

Every file is written atomically (a temp file in the target folder, fsynced, renamed), as
:func:`vfmkd.utils.checkpoint.save_checkpoint` writes checkpoints.
"""
from __future__ import annotations

import copy
import datetime
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from vfmkd.core.config import experiment_record
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.engine.builders import build_model
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.utils.checkpoint import load_checkpoint

FORMATS = ("onnx", "torchscript", "ultralytics")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript", "ultralytics": ".pt"}
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
    items = state.items() if isinstance(state, Mapping) else enumerate(state) if isinstance(state, (list, tuple)) else ()
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


class ExportedStudent(nn.Module):
    """The student as a deployable graph: ``forward((B, 3, H, W) float in [0, 1])`` returns the eval
    output of each head (one tensor for a single head, a tuple in ``head_names`` order otherwise).
    Backbone features and neck maps are not outputs; nothing of the distiller is inside."""

    def __init__(self, model: UnifiedModel, dynamic: bool = False, fmt: str = "onnx") -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()  # the export flags below stay off the caller's model
        self.head_names = list(model.heads)
        for m in self.model.modules():
            # ultralytics' Exporter does the same to its Detect heads: return the decoded tensor alone
            # and, for dynamic shapes, rebuild the anchor grid in the graph instead of baking it in.
            if hasattr(m, "export") and hasattr(m, "format") and hasattr(m, "dynamic"):
                m.export, m.format, m.dynamic = True, fmt, dynamic
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor):
        fused = self.model.neck(self.model.backbone(self.model.prepare_input(x)))  # DSRL: downscaled input
        outs = []
        for name in self.head_names:
            y = self.model.heads[name](fused)
            if isinstance(y, (tuple, list)):
                y = y[0]  # the eval convention of vfmkd heads: (predictions, raw training dict)
            if not isinstance(y, torch.Tensor):
                raise ConfigError(f"head '{name}' returns a {type(y).__name__} in eval mode; export needs a tensor")
            outs.append(y)
        return outs[0] if len(outs) == 1 else tuple(outs)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path``; renamed onto it (after an fsync) when the block succeeds, removed
    otherwise, so a failed or killed export never leaves a partial file under the final name."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file name (e.g. {path / 'model.onnx'})")
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the output folder {path.parent}: {exc}") from None
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"cannot write to {path.parent} (permission denied); pass another --output")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def example_input(imgsz: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed))


class ExportMismatchError(RuntimeError):
    """The exported graph does not reproduce the PyTorch student within the tolerance."""


def export_onnx(model: UnifiedModel, path: Path, imgsz: int, dynamic: bool = False, opset: int = ONNX_OPSET,
                tolerance: Optional[float] = ONNX_TOLERANCE) -> Dict[str, float]:
    """ONNX graph of the student, input ``images`` (B, 3, imgsz, imgsz); with ``dynamic`` the batch,
    height and width (multiples of 32) are free. Before the rename it passes ``onnx.checker`` and,
    unless ``tolerance`` is None, ONNX Runtime reproduces PyTorch on a probe input within it
    (:func:`compare_onnx`'s ``max_scaled``; else ExportMismatchError and no file). Returns the diffs."""
    import onnx  # optional at import time of vfmkd: only the export needs it

    wrapped = ExportedStudent(model, dynamic=dynamic, fmt="onnx")
    outputs = ["output0"] if len(wrapped.head_names) == 1 else [f"output_{n}" for n in wrapped.head_names]
    axes = None
    if dynamic:
        axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, **{o: {0: "batch", 2: "anchors"} for o in outputs}}
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(wrapped, (example_input(imgsz),), str(tmp), opset_version=opset, input_names=[INPUT_NAME],
                          output_names=outputs, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(onnx.load(str(tmp)))
        diff = compare_onnx(model, tmp, example_input(imgsz, batch=2 if dynamic else 1, seed=1))
        if tolerance is not None and diff["max_scaled"] > tolerance:
            hint = ""
            if any(getattr(h, "set_prediction", False) for h in model.heads.values()):
                hint = (" RT-DETR picks its queries by the top-k encoder scores: when many scores are equal (an "
                        "untrained or barely trained head) ONNX Runtime and PyTorch pick different queries; export a "
                        "trained checkpoint.")
            raise ExportMismatchError(f"ONNX Runtime differs from PyTorch by {diff['max_scaled']:.2e} (> {tolerance:.0e}; "
                                      f"boxes in units of the input size): {diff}; nothing written to {path}.{hint}")
    return diff


def export_torchscript(model: UnifiedModel, path: Path, imgsz: int, dynamic: bool = False) -> Path:
    """A traced TorchScript module (``torch.jit.load(path)(images)``); with ``dynamic`` the anchor grid
    is computed in the graph, so other input sizes and batch sizes work."""
    wrapped = ExportedStudent(model, dynamic=dynamic, fmt="torchscript")
    with atomic_path(path) as tmp, torch.no_grad():
        traced = torch.jit.trace(wrapped, (example_input(imgsz),), strict=False, check_trace=False)
        with open(tmp, "wb") as f:
            torch.jit.save(traced, f)
    return path


def onnx_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare_onnx(model: UnifiedModel, path: Path, images: torch.Tensor) -> Dict[str, float]:
    """|ONNX Runtime - PyTorch| of the student on ``images``: ``max_abs`` over every output value;
    for a YOLO detection output also ``boxes_px`` (xywh, input pixels), ``scores`` (probabilities) and
    ``max_scaled``, the largest of ``scores`` and ``boxes_px`` / input size. Box coordinates reach
    ~500 px at 640, where one float32 step is 6e-5 px, so boxes are compared in image units. A
    set-prediction head (``set_prediction``: RT-DETR's queries) is compared as a set
    (:func:`matched_query_difference`)."""
    session = onnx_session(path)
    got = session.run(None, {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        want = ExportedStudent(model, dynamic=True)(images)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    out = {"max_abs": 0.0, "max_scaled": 0.0}
    size = float(max(images.shape[-2:]))
    query_sets = [bool(getattr(h, "set_prediction", False)) for h in model.heads.values()]
    for g, w, is_set in zip(got, want, query_sets):
        d = matched_query_difference(g, w.numpy(), size) if is_set else np.abs(g - w.numpy())
        out["max_abs"] = max(out["max_abs"], float(d.max()))
        if d.ndim == 3 and d.shape[1] > 4:  # (B, 4 + nc, anchors): decoded boxes, then class probabilities
            out["boxes_px"] = max(out.get("boxes_px", 0.0), float(d[:, :4].max()))
            out["scores"] = max(out.get("scores", 0.0), float(d[:, 4:].max()))
            out["max_scaled"] = max(out["max_scaled"], out["boxes_px"] / size, out["scores"])
        else:
            out["max_scaled"] = max(out["max_scaled"], float(d.max()))
    return out


def matched_query_difference(got: np.ndarray, want: np.ndarray, size: float) -> np.ndarray:
    """|got - want| of a set-prediction head's (B, 4 + nc, Q) output (RT-DETR: boxes in input pixels,
    then class probabilities) with the queries matched one to one per image (Hungarian, on each pair's
    largest difference, boxes in units of ``size``): the queries are an unordered set, and ONNX
    Runtime's TopK may order queries of equal encoder score differently from torch.topk."""
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 (an ultralytics dependency)

    scale = np.ones(got.shape[1], dtype=np.float64)
    scale[:4] = size
    out = np.empty_like(got)
    for b in range(got.shape[0]):
        g, w = got[b].T.astype(np.float64), want[b].T.astype(np.float64)  # (Q, 4 + nc)
        cost = (np.abs(g[:, None, :] - w[None, :, :]) / scale).max(-1)
        rows, cols = linear_sum_assignment(cost)
        out[b][:, rows] = np.abs(g[rows] - w[cols]).T
    return out


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
        raise ConfigError(f"--format ultralytics needs a YOLOv8 student laid out as ultralytics' yolov8.yaml: {problem}")
    m = experiment_record(cfg).model
    variant = str(dict(m.backbone).get("variant", "n"))
    nc = int(dict(m.heads)["detection"].get("num_classes", 80))
    um = DetectionModel(f"yolov8{variant}.yaml", ch=3, nc=nc, verbose=False)
    ours = {ultralytics_key(k): v for k, v in model.state_dict().items()}
    theirs = um.state_dict()
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    shapes = [k for k in theirs.keys() & ours.keys() if theirs[k].shape != ours[k].shape]
    if missing or extra or shapes:
        raise ConfigError(f"the student's weights do not map onto ultralytics' yolov8{variant}.yaml: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}, shape mismatches {sorted(shapes)[:5]}")
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
        raise ConfigError(f"ultralytics' yolov8{variant} with the student's weights differs from the student by {diff:.2e}")
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


def default_output(checkpoint: Path, fmt: str) -> Path:
    """``<run>/checkpoints/best.pt`` -> ``<run>/checkpoints/best.onnx`` (``best.torchscript``,
    ``best.ultralytics.pt``)."""
    stem = checkpoint.with_suffix("")
    return stem.with_name(stem.name + (".ultralytics.pt" if fmt == "ultralytics" else SUFFIXES[fmt]))


def export_student(model: UnifiedModel, cfg: Dict[str, Any], fmt: str, output: Path, imgsz: int,
                   dynamic: bool = False, names: Optional[Mapping[int, str]] = None) -> Dict[str, float]:
    """Write ``output``; returns the ONNX Runtime vs PyTorch diffs for onnx, else {}."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; choose from {', '.join(FORMATS)}")
    if imgsz <= 0 or imgsz % 32:
        raise ConfigError(f"--imgsz {imgsz} must be a positive multiple of 32 (the student's largest stride)")
    if fmt == "onnx":
        return export_onnx(model, output, imgsz, dynamic)
    if fmt == "torchscript":
        export_torchscript(model, output, imgsz, dynamic)
    else:
        export_ultralytics(model, cfg, names or {}, output, imgsz)
    return {}
