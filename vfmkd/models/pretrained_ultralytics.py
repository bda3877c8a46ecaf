"""Ultralytics YOLOv8 checkpoints (``yolov8n.pt``, ``yolov8s-seg.pt``) as student initialisation.

Such a file is a pickle of the model object (``{'model': DetectionModel, 'train_args': ..., ...}``). It
is loaded with ``torch.load(weights_only=True)`` and an allow-list: only ``torch.nn`` modules and
ultralytics' ``ultralytics.nn`` module classes may be rebuilt (object creation without ``__init__`` plus
an attribute update: no code of the file runs). Any other class is refused by
:func:`vfmkd.utils.checkpoint.load_checkpoint` with its one-line conversion command.

The layers of ultralytics' ``yolov8.yaml`` (``model.N.*``) map onto vfmkd's YOLOv8 modules, which are
built from the same ultralytics blocks, so the tensors below each layer keep their names.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.models.backbones.yolov8 import YOLOV8_VARIANTS, YOLOv8Backbone, yolo_channels
from vfmkd.models.necks.yolov8_pafpn import YOLOv8PAFPN
from vfmkd.models.pretrained import SourceTensors
from vfmkd.utils.checkpoint import load_checkpoint

# Classes a checkpoint may rebuild: nn.Module subclasses from these packages (and ultralytics' args namespace).
ALLOWED_MODULE_PREFIXES = ("ultralytics.nn.", "torch.nn.modules.")
ALLOWED_EXTRA = ("ultralytics.utils.IterableSimpleNamespace",)

# ultralytics' yolov8.yaml, layer by layer: its class name and the vfmkd module it becomes (None: no weights).
YOLOV8_LAYOUT = (
    ("Conv", "backbone.stem.0"), ("Conv", "backbone.stem.1"), ("C2f", "backbone.stem.2"),
    ("Conv", "backbone.stage3.0"), ("C2f", "backbone.stage3.1"), ("Conv", "backbone.stage4.0"),
    ("C2f", "backbone.stage4.1"), ("Conv", "backbone.stage5.0"), ("C2f", "backbone.stage5.1"),
    ("SPPF", "backbone.stage5.2"),
    ("Upsample", None), ("Concat", None), ("C2f", "neck.td4"), ("Upsample", None), ("Concat", None),
    ("C2f", "neck.td3"), ("Conv", "neck.down3"), ("Concat", None), ("C2f", "neck.bu4"), ("Conv", "neck.down4"),
    ("Concat", None), ("C2f", "neck.bu5"),
)
HEAD_TYPES = ("Detect", "Segment")  # layer 22; vfmkd's yolo_head / yolo_seg_head hold it as `.detect`


def _allowed_class(name: str) -> Optional[type]:
    module, _, attr = name.rpartition(".")
    if not (module.startswith(ALLOWED_MODULE_PREFIXES) or name in ALLOWED_EXTRA):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    ok = isinstance(obj, type) and (issubclass(obj, nn.Module) or name in ALLOWED_EXTRA)
    return obj if ok else None


def load_allowing_ultralytics(path: Path) -> Dict[str, Any]:
    """:func:`load_checkpoint` (weights_only=True) with ultralytics' model classes allowed."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # missing or damaged: load_checkpoint names the problem
        names = []
    allowed = [c for c in map(_allowed_class, names) if c is not None]
    refused = [n for n in names if _allowed_class(n) is None]
    if refused and any(n.startswith("ultralytics.") for n in names):  # other pickles: load_checkpoint's message
        raise CheckpointError(
            f"model.init: {path} was refused: it references {', '.join(refused[:4])}, beyond the allow-list of "
            "torch.nn and ultralytics.nn module classes (unpickling other objects can run code). If you trust it, "
            f"re-save the model alone once: python -c \"import torch; from ultralytics import YOLO; "
            f"torch.save({{'model': YOLO('{path}').model}}, '{path.with_suffix('')}.model.pt')\"")
    with torch.serialization.safe_globals(allowed):
        return load_checkpoint(path)


def ultralytics_model(obj: Mapping[str, Any]) -> Optional[nn.Module]:
    """The model object of an ultralytics checkpoint (its EMA first, as ultralytics loads it), else None."""
    for key in ("ema", "model"):
        model = obj.get(key)
        if isinstance(model, nn.Module) and type(model).__module__.startswith("ultralytics."):
            return model
    return None


def _file_variant(yolo: nn.Module) -> str:
    width = yolo.model[0].conv.out_channels
    for variant, mult in YOLOV8_VARIANTS.items():
        if yolo_channels(64, mult) == width:
            return variant
    return f"width {width}"


def yolov8_source(yolo: nn.Module, model: nn.Module, path: Path) -> SourceTensors:
    """The tensors of an ultralytics YOLOv8 model named as in ``model`` (a UnifiedModel with a yolov8
    backbone). The head goes to every yolo_head / yolo_seg_head of the student."""
    layers = [type(m).__name__ for m in yolo.model]
    expected = [name for name, _ in YOLOV8_LAYOUT]
    what = getattr(yolo, "yaml", {}).get("yaml_file", type(yolo).__name__)
    if layers[:len(expected)] != expected or len(layers) != len(expected) + 1:
        raise CheckpointError(
            f"model.init: {path} is an ultralytics {what} model whose layers ({', '.join(layers[:12])}, ...) are not "
            f"YOLOv8's; vfmkd's yolov8 student starts from YOLOv8 n/s/m/l/x detect or seg checkpoints (yolov8n.pt, "
            f"yolov8s-seg.pt)")
    if not isinstance(model.backbone, YOLOv8Backbone):
        raise ConfigError(f"model.init: {path} is an ultralytics YOLOv8 checkpoint; it initialises a yolov8 backbone, "
                          f"the student's is {type(model.backbone).__name__} (use a timm or vfmkd file for it)")
    variant = _file_variant(yolo)
    if variant != model.backbone.variant:
        raise ConfigError(
            f"model.init: {path} is a YOLOv8{variant}, the student a yolov8 '{model.backbone.variant}': use "
            f"model.backbone.config=configs/backbones/yolov8{variant}.yaml (and model.neck.depth="
            f"{len(yolo.model[12].m)}), or the yolov8{model.backbone.variant} file")
    head = yolo.model[-1]
    yolo_heads = [n for n, h in model.heads.items() if hasattr(h, "detect")] or ["detection"]
    targets: Dict[int, List[str]] = {i: [prefix] for i, (_, prefix) in enumerate(YOLOV8_LAYOUT) if prefix}
    targets[len(YOLOV8_LAYOUT)] = [f"heads.{n}.detect" for n in yolo_heads] if type(head).__name__ in HEAD_TYPES else []
    tensors: Dict[str, torch.Tensor] = {}
    unplaced = []
    for key, value in yolo.state_dict().items():
        _, index, rest = key.split(".", 2)  # model.<N>.<rest>
        for prefix in targets.get(int(index), []):
            tensors[f"{prefix}.{rest}"] = value
        if not targets.get(int(index)):
            unplaced.append(key)
    notes = []
    depth = len(yolo.model[12].m)
    if isinstance(model.neck, YOLOv8PAFPN) and len(model.neck.td4.m) != depth:
        notes.append(f"the file's neck has C2f depth {depth}, the student's {len(model.neck.td4.m)}: "
                     f"set model.neck.depth={depth}")
    file_nc = int(getattr(head, "nc", 0))
    for name in yolo_heads:
        nc = getattr(model.heads[name], "num_classes", None) if name in model.heads else None
        protos = getattr(getattr(head, "proto", None), "cv1", None)
        own = getattr(getattr(model.heads[name], "detect", None), "proto", None) if name in model.heads else None
        if protos is not None and own is not None and own.cv1.conv.out_channels != protos.conv.out_channels:
            notes.append(f"heads.{name}: the file has {protos.conv.out_channels} prototype channels: set "
                         f"model.heads.{name}.num_protos={protos.conv.out_channels}")
        if nc is not None and nc != file_nc:
            notes.append(f"heads.{name}: {nc} classes, the file {file_nc}: its box branch loads, its class "
                         f"branch does not (shape-mismatched)")
    parts = ("backbone", "neck", "heads") if targets[len(YOLOV8_LAYOUT)] else ("backbone", "neck")
    return SourceTensors(f"ultralytics {what} ({type(head).__name__}, {file_nc} classes)", tensors, parts,
                         unplaced=unplaced, notes=notes)
