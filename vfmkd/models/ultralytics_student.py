"""Any ultralytics detection / instance-segmentation model as the student (YOLOv8, YOLO11, YOLO26, ...).

ultralytics builds the network, vfmkd splits it where its own students split:

* backbone ``ultralytics`` (``model: yolo11n.yaml | yolo26n-seg.yaml | yolov8s.yaml | path/to/yolo11n.pt``):
  every layer but the last, run as ultralytics runs them (each layer's ``f`` inputs, the ``save`` list);
  its outputs are the last layer's inputs, named by stride (``P3`` (B, C3, H/8, W/8), ``P4``, ``P5``; a
  P2/P6 model gives ``P2``/``P6`` too). These are the maps feature distillation reads: the Detect/Segment
  inputs, i.e. after ultralytics' own neck.
* neck ``identity``: nothing to add (the model's neck is part of the trunk above).
* head ``ultralytics_detect`` / ``ultralytics_segment``: the model's own last layer (``Detect``,
  ``Segment``, ``Segment26``, with YOLO26's one-to-one branch), as ``.detect``; trained by the
  ``ultralytics`` loss (vfmkd/distillation/losses/ultralytics_loss.py), which asks the model class for its
  own criterion (``init_criterion``: ``v8DetectionLoss``, ``E2ELoss``, ``SegmentLoss26`` ...).

The backbone and the head each build the model from the same ``model`` entry (same ``num_classes``) and keep
their part; a ``.pt`` file gives both their trained tensors. ``.pt`` files are loaded with
``torch.load(weights_only=True)`` and an allow-list of ultralytics/torch module classes
(:func:`vfmkd.models.pretrained_ultralytics.load_allowing_ultralytics`): no code of the file runs.
ultralytics' own ``torch_safe_load`` unpickles without ``weights_only`` and is not used.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from ultralytics.nn.modules import Detect, Segment
from ultralytics.nn.tasks import DetectionModel, SegmentationModel, guess_model_task, yaml_model_load

from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import BACKBONES, HEADS, NECKS
from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.heads.base import BaseHead
from vfmkd.models.pretrained_ultralytics import load_allowing_ultralytics, ultralytics_model

#: ultralytics task -> the model class that builds it (what vfmkd can train: boxes, instance masks)
MODEL_CLASSES = {"detect": DetectionModel, "segment": SegmentationModel}


def build_ultralytics(model: str, num_classes: Optional[int] = None) -> DetectionModel:
    """The ultralytics model of a YAML (``yolo11n.yaml``: ultralytics' own, scale from the name) or a ``.pt``
    file, in float32 and train mode. ``num_classes``: the class count (a file of another count keeps every
    tensor whose shape fits, as ultralytics' ``model.load`` does)."""
    if not isinstance(model, str) or not model:
        raise ConfigError(f"model.backbone.model must name an ultralytics model YAML or .pt file (yolo11n.yaml, "
                          f"yolo26n-seg.yaml, yolov8s.yaml, path/to/yolo11n.pt), got {model!r}")
    if model.endswith(".pt"):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"model.backbone.model: {path} is not a file (absolute: {path.resolve()}); ultralytics "
                              "checkpoints cannot be downloaded here: copy the .pt there, or name a YAML to start "
                              "from random weights")
        loaded = ultralytics_model(load_allowing_ultralytics(path))
        if loaded is None:
            raise ConfigError(f"model.backbone.model: {path} holds no ultralytics model object ('model'/'ema')")
        cls = _model_class(loaded.yaml, model)
        nc = num_classes if num_classes is not None else int(loaded.model[-1].nc)
        if nc == int(loaded.model[-1].nc) and type(loaded) is cls:
            built = loaded
        else:
            built = cls(copy.deepcopy(loaded.yaml), nc=nc, verbose=False)
            built.load(loaded, verbose=False)
        return built.float().train()
    try:
        cfg = yaml_model_load(model)
    except FileNotFoundError:
        raise ConfigError(f"model.backbone.model: no ultralytics model YAML '{model}' (ultralytics' own, e.g. "
                          "yolo11n.yaml, yolo26s-seg.yaml, yolov8m.yaml, or a path to one)") from None
    cls = _model_class(cfg, model)
    return cls(cfg, nc=num_classes, verbose=False).float().train()


#: the model the last ``ultralytics`` backbone built, keyed by (model, num_classes), for the head built next
#: (UnifiedModel.from_config builds the backbone, then the heads): one build, one model split in two.
_HANDOVER: Dict[Tuple[str, Optional[int]], nn.Module] = {}


def _model_class(cfg: dict, name: str) -> type:
    task = guess_model_task(cfg)
    if task not in MODEL_CLASSES:
        raise ConfigError(f"model.backbone.model: {name} is an ultralytics '{task}' model; vfmkd trains "
                          f"{' and '.join(MODEL_CLASSES)} models (boxes, instance masks)")
    return MODEL_CLASSES[task]


def level_name(stride: float) -> str:
    """``P3`` for stride 8: the pyramid level ultralytics' YAMLs call it."""
    return f"P{int(round(math.log2(stride)))}"


@BACKBONES.register("ultralytics")
class UltralyticsBackbone(BaseBackbone):
    """Every layer of an ultralytics model but its head. ``forward((B, 3, H, W))`` -> the head's inputs
    ``{"P3": (B, C3, H/8, W/8), "P4": (B, C4, H/16, W/16), "P5": (B, C5, H/32, W/32)}`` (named by stride).
    ``model``: an ultralytics YAML or .pt (module doc); ``num_classes``: as the head's (only the head uses it)."""

    def __init__(self, model: str, num_classes: Optional[int] = None) -> None:
        super().__init__()
        yolo = build_ultralytics(model, num_classes)
        _HANDOVER.clear()
        _HANDOVER[(model, num_classes)] = yolo  # its head goes to the ultralytics head built next
        head = yolo.model[-1]
        self.source = model
        self.num_classes = num_classes
        self.layers = nn.ModuleList(list(yolo.model)[:-1])
        self.save = set(yolo.save)
        self.head_inputs: List[int] = list(head.f) if isinstance(head.f, (list, tuple)) else [head.f]
        channels = _head_in_channels(head)
        strides = yolo.stride.tolist()
        self._specs = tuple(FeatureSpec(level_name(float(s)), c, int(s)) for s, c in zip(strides, channels))
        self.variant = Path(model).stem  # what messages and the model summary call it
        self.yaml = copy.deepcopy(yolo.yaml)  # what ultralytics needs to stand the model up again (assemble)

    def assemble(self, head: nn.Module) -> DetectionModel:
        """ultralytics' own model object again: a copy of these layers and ``head`` (an ultralytics head
        built with this backbone), in eval mode, for ultralytics' exporter and ``YOLO`` (the student's
        weights, nothing rebuilt)."""
        yolo = head.model_class.__new__(head.model_class)
        nn.Module.__init__(yolo)
        yolo.yaml = copy.deepcopy(self.yaml)
        yolo.model = nn.Sequential(*copy.deepcopy(list(self.layers)), copy.deepcopy(head.detect))
        yolo.save = sorted(self.save)
        yolo.stride = head.detect.stride.clone()
        yolo.inplace = self.yaml.get("inplace", True)
        yolo.names = {i: f"class{i}" for i in range(int(head.detect.nc))}
        yolo.task = guess_model_task(self.yaml)  # ultralytics' exporter and YOLO read it
        return yolo.eval()

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        outputs: List[Optional[torch.Tensor]] = []
        for m in self.layers:  # ultralytics' BaseModel._predict_once, without its profiling/visualising
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save or m.i in self.head_inputs else None)
        levels = [x if j == -1 else outputs[j] for j in self.head_inputs]
        return OrderedDict((spec.name, t) for spec, t in zip(self._specs, levels))


def _head_in_channels(head: nn.Module) -> List[int]:
    """The input channels of each level of an ultralytics Detect/Segment head (its box branch's first conv)."""
    return [int(branch[0].conv.in_channels) for branch in head.cv2]


@NECKS.register("identity")
class IdentityNeck(nn.Module):
    """No neck: the backbone's levels go to the heads as they are (``in_specs`` in, the same specs out)."""

    def __init__(self, in_specs: Sequence[FeatureSpec]) -> None:
        super().__init__()
        self._specs = tuple(in_specs)

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    def forward(self, feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return feats


class _UltralyticsHead(BaseHead):
    """The last layer of an ultralytics model (module doc). Training: ultralytics' raw dict (``boxes``
    (B, 4*reg_max, A), ``scores`` (B, nc, A), ``feats``; ``mask_coefficient``/``proto`` for Segment; an
    end-to-end head nests it as ``{"one2many": ..., "one2one": ...}``, what its criterion reads). Eval:
    ``(predictions (B, 4 + nc [+ nm], A) xywh in input pixels, raw dict)`` with the one-to-many branch's
    dict for an end-to-end head, so vfmkd's scorers (NMS) read every model alike."""

    kind: type = Detect
    #: the LOSSES entry that trains it (the model's own criterion): implied when distillation.losses names none
    own_loss = "ultralytics"

    def __init__(self, in_specs: Sequence[FeatureSpec], model: str, num_classes: Optional[int] = None) -> None:
        super().__init__()
        yolo = _HANDOVER.pop((model, num_classes), None) or build_ultralytics(model, num_classes)
        head = yolo.model[-1]
        if not isinstance(head, self.kind) or (self.kind is Detect and isinstance(head, Segment)):
            raise ConfigError(f"{model} ends in {type(head).__name__}; use head type "
                              f"{'ultralytics_segment' if isinstance(head, Segment) else 'ultralytics_detect'}")
        got = [s.channels for s in in_specs]
        if got != _head_in_channels(head):
            raise ConfigError(f"{model}'s {type(head).__name__} reads {_head_in_channels(head)} channels, the neck "
                              f"gives {got}: use neck type identity and the same model as the backbone")
        self.num_classes = int(head.nc)
        self.level_names = [s.name for s in in_specs]
        self.detect = head
        self.model_class = type(yolo)  # its init_criterion picks the loss (ultralytics loss)
        self.end2end = getattr(head, "one2one_cv2", None) is not None

    def forward(self, feats: Dict[str, torch.Tensor]):
        out = self.detect([feats[n] for n in self.level_names])
        if self.training or not isinstance(out, tuple):
            return out
        predictions, raw = out
        if isinstance(raw, dict) and "one2many" in raw:
            raw = raw["one2many"]
        return predictions, raw


@HEADS.register("ultralytics_detect")
class UltralyticsDetectHead(_UltralyticsHead):
    """An ultralytics model's ``Detect`` head (YOLOv8/11/26) for the detection task (see the class above)."""

    task = "detection"


@HEADS.register("ultralytics_segment")
class UltralyticsSegmentHead(_UltralyticsHead):
    """An ultralytics model's ``Segment``/``Segment26`` head for the instance task (see the class above)."""

    task = "instance"
    kind = Segment


#: the ``model.neck`` a section has when it names none (ModelConfig's default)
_DEFAULT_NECK = {"type": "yolov8_pafpn"}


def complete_ultralytics_section(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``model`` section of an ultralytics student with what it implies filled in: neck ``identity`` where
    the section names none, each ultralytics head's ``model`` (and the backbone's ``num_classes``) from the
    other side, so ``backbone: {type: ultralytics, model: yolo11n.yaml}`` plus ``heads: {detection: {type:
    ultralytics_detect, num_classes: 80}}`` is a whole student. Other sections come back unchanged."""
    out = dict(model_cfg)
    backbone = dict(out.get("backbone") or {})
    if backbone.get("type") != "ultralytics":
        return out
    heads = {name: dict(h) for name, h in (out.get("heads") or {}).items()}
    ours = [h for h in heads.values() if h.get("type") in ("ultralytics_detect", "ultralytics_segment")]
    for h in ours:
        h.setdefault("model", backbone.get("model"))
    if ours and "num_classes" not in backbone and "num_classes" in ours[0]:
        backbone["num_classes"] = ours[0]["num_classes"]
    if not out.get("neck") or dict(out["neck"]) == _DEFAULT_NECK:
        out["neck"] = {"type": "identity"}
    out["backbone"], out["heads"] = backbone, heads
    return out
