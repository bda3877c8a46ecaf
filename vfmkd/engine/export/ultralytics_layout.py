"""``--format ultralytics``: the YOLOv8 student as ultralytics' own ``DetectionModel`` (built from its
yolov8{variant}.yaml, the student's weights mapped in layer by layer and checked to give the same
output), saved as an ultralytics ``.pt`` that ``ultralytics.YOLO(path)`` predicts and validates with. An
ultralytics student (backbone ``ultralytics``) is ultralytics' model already: its layers are put back
together (:meth:`~vfmkd.models.ultralytics_student.UltralyticsBackbone.assemble`). ``--format ultralytics_onnx``
runs ultralytics' own exporter on that model (:func:`export_through_ultralytics`)."""
from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from vfmkd.core.config import experiment_record
from vfmkd.core.errors import ConfigError
from vfmkd.engine.export.outputs import atomic_path
from vfmkd.engine.export.student_graph import ExportedStudent, example_input
from vfmkd.models.ultralytics_student import UltralyticsBackbone
from vfmkd.models.unified_model import UnifiedModel

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

    if isinstance(model.backbone, UltralyticsBackbone):
        return _assembled(model, names)
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
    backbone = dict(experiment_record(cfg).model.backbone)
    source = backbone.get("model") or f"yolov8{backbone.get('variant', 'n')}.yaml"
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
        "train_args": {"task": getattr(um, "task", "detect"), "imgsz": int(imgsz), "model": str(source),
                       "note": "exported from a vfmkd checkpoint by tools/export.py"},
        "train_metrics": None,
        "train_results": None,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)  # a file object: the archive's inner folder is "archive", not the temp name
    return path


def _assembled(model: UnifiedModel, names: Mapping[int, str]):
    """An ultralytics student's own model object (its layers and head put back together), frozen, named."""
    heads = [h for h in model.heads.values() if hasattr(h, "model_class")]
    if len(heads) != 1:
        raise ConfigError(f"an ultralytics student exports with exactly one ultralytics head, it has {len(heads)}")
    um = model.backbone.assemble(heads[0])
    if names:
        um.names = {int(k): str(v) for k, v in names.items()}
    for p in um.parameters():
        p.requires_grad_(False)
    return um


def export_through_ultralytics(model: UnifiedModel, cfg: Dict[str, Any], names: Mapping[int, str], path: Path,
                               imgsz: int, fmt: str = "onnx") -> Path:
    """``path`` written by ultralytics' own ``Exporter`` (``fmt``: onnx, or another format ultralytics exports to
    with what is installed) from the student as ultralytics' model (:func:`to_ultralytics`): the graph ultralytics
    users deploy (``(1, 4 + nc [+ nm], A)`` decoded boxes and scores, as ``yolo export`` writes it). Static shape,
    batch 1, float32, no simplification (onnxslim is not a dependency); written in a temporary folder, then
    renamed into place."""
    import tempfile

    from ultralytics.engine.exporter import Exporter

    um = to_ultralytics(model, cfg, names)
    with tempfile.TemporaryDirectory(prefix="vfmkd_ultralytics_export_") as tmp:
        um.pt_path = str(Path(tmp) / "student.pt")  # the exporter names its output after it
        um.args = {"task": um.task, "data": ""}
        overrides = {"format": fmt, "imgsz": int(imgsz), "simplify": False, "device": "cpu", "dynamic": False,
                     "batch": 1}
        written = Path(Exporter(overrides=overrides)(model=um))
        with atomic_path(path) as out:
            Path(written).replace(out)
    return path

