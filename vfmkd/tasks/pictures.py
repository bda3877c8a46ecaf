"""What a task asks the engine to draw for its head: :class:`Prediction` (one head's output or ground
truth for a batch, typed by its picture ``kind``), :class:`PanelRow` (one head in a panel: student,
teacher, ground truth) and :class:`PictureContext` (what the engine hands a task's ``picture_row``:
class names, the head module, the teacher's columns it computed). The engine draws
(:func:`vfmkd.engine.pictures.prediction_panel.render_panel`); the task says what to draw.

Every map is in the student canvas frame (the frame of the batch's images) at any resolution (stride 4
or 8 maps are resized to the image); boxes are xyxy canvas pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from ultralytics.utils.nms import non_max_suppression

#: what a picture is drawn from: a tensor or an array (either is read as a detached CPU tensor)
Maps = Union[torch.Tensor, np.ndarray]

#: the picture kinds a :class:`Prediction` holds (how a column is drawn, not a task; the name is written
#: beside each panel row): a class label map, a foreground probability map, instance masks, boxes
LABEL_MAP, PROBABILITY_MAP, INSTANCE_MASKS, BOXES = "semantic", "binary", "instance", "boxes"
KINDS = (LABEL_MAP, PROBABILITY_MAP, INSTANCE_MASKS, BOXES)


def as_cpu_tensor(x: Any) -> torch.Tensor:
    """A tensor or array as a detached CPU tensor (what every drawing step reads)."""
    return (torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x).detach().cpu()


def _per_image(x: Optional[Sequence[Any]]) -> Optional[List[torch.Tensor]]:
    return None if x is None else [as_cpu_tensor(v) for v in x]


def split_by_image(values: Maps, batch_idx: Maps, num_images: int) -> List[torch.Tensor]:
    """Flat per-instance rows (N, ...) with their image index (N,) -> one tensor per image, e.g.
    teacher mask logits ``MaskLogits.logits`` / ``batch_idx`` into the per-image lists that
    :meth:`Prediction.instances` takes."""
    values, idx = as_cpu_tensor(values), as_cpu_tensor(batch_idx).long().view(-1)
    return [values[idx == i] for i in range(num_images)]


@dataclass
class Prediction:
    """One head's prediction (or ground truth) for a batch of B images, typed by ``kind``.

    - ``semantic``: ``labels`` (B, H, W) int class index (0 = unlabelled, drawn black) and/or
      ``probs`` (B, K, H, W) softmax probabilities (labels = argmax when only probs are given; the
      difference map uses probs when both sides have them, else label disagreement).
    - ``binary``: ``probs`` (B, H, W) foreground probability in [0, 1]; ``ignore`` (B, H, W) bool
      pixels not drawn (ground-truth padding, 255 in ``Batch.binary``).
    - ``instance``: ``masks`` per image (n, H, W), bool or float probabilities in [0, 1]
      (thresholded at 0.5 for drawing), ``cls`` per image (n,), optional ``boxes`` (n, 4) xyxy
      canvas pixels and ``scores`` (n,).
    - ``boxes``: ``boxes`` per image (n, 4) xyxy canvas pixels, ``cls`` (n,), optional ``scores``.

    Build with the class methods (:meth:`semantic`, :meth:`binary`, :meth:`binary_target`,
    :meth:`instances`, :meth:`detections`); maps may have any resolution (resized to the image).
    """

    kind: str
    labels: Optional[torch.Tensor] = None
    probs: Optional[torch.Tensor] = None
    ignore: Optional[torch.Tensor] = None
    masks: Optional[List[torch.Tensor]] = None
    boxes: Optional[List[torch.Tensor]] = None
    cls: Optional[List[torch.Tensor]] = None
    scores: Optional[List[torch.Tensor]] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Prediction kind '{self.kind}' is not one of {', '.join(KINDS)}")
        need = {LABEL_MAP: ("labels",), PROBABILITY_MAP: ("probs",), INSTANCE_MASKS: ("masks", "cls"),
                BOXES: ("boxes", "cls")}
        missing = [f for f in need[self.kind] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a '{self.kind}' Prediction needs {', '.join(missing)}")
        per_image = [getattr(self, f) for f in ("masks", "boxes", "cls", "scores") if getattr(self, f) is not None]
        if len({len(v) for v in per_image}) > 1:
            raise ValueError(f"a '{self.kind}' Prediction has per-image lists of different lengths")

    @property
    def num_images(self) -> int:
        if self.kind in (LABEL_MAP, PROBABILITY_MAP):
            return int((self.labels if self.labels is not None else self.probs).shape[0])
        return len(self.cls)  # type: ignore[arg-type]

    @classmethod
    def semantic(cls, labels: Optional[Maps] = None, probs: Optional[Maps] = None,
                 ignore: Optional[Maps] = None) -> Prediction:
        """Label maps (B, H, W) and/or class probabilities (B, K, H, W) (softmax of the logits)."""
        if labels is None and probs is None:
            raise ValueError("a semantic Prediction needs labels (B, H, W) or probs (B, K, H, W)")
        p = None if probs is None else as_cpu_tensor(probs).float()
        lab = as_cpu_tensor(labels).long() if labels is not None else p.argmax(1)  # type: ignore[union-attr]
        return cls(LABEL_MAP, labels=lab, probs=p, ignore=None if ignore is None else as_cpu_tensor(ignore).bool())

    @classmethod
    def binary(cls, probs: Maps, ignore: Optional[Maps] = None) -> Prediction:
        """Foreground probabilities (B, H, W) or (B, 1, H, W) in [0, 1] (sigmoid of the logits)."""
        p = as_cpu_tensor(probs).float()
        if p.dim() == 4:
            p = p[:, 0]
        mask = None if ignore is None else as_cpu_tensor(ignore).bool()
        return cls(PROBABILITY_MAP, probs=p.clamp(0, 1), ignore=mask)

    @classmethod
    def binary_target(cls, mask: Maps, ignore_value: int = 255) -> Prediction:
        """Ground truth as ``Batch.binary``: (B, H, W) uint8 {0, 1}, ``ignore_value`` = not drawn."""
        m = as_cpu_tensor(mask)
        return cls.binary((m == 1).float(), ignore=m == ignore_value)

    @classmethod
    def instances(cls, masks: Sequence[Maps], classes: Sequence[Maps], boxes: Optional[Sequence[Maps]] = None,
                  scores: Optional[Sequence[Maps]] = None) -> Prediction:
        """Per image: masks (n, H, W) bool or probabilities, classes (n,), optional boxes (n, 4) xyxy
        canvas pixels and scores (n,). Flat (N, ...) tensors: see :func:`split_by_image`."""
        return cls(INSTANCE_MASKS, masks=_per_image(masks), cls=_per_image(classes), boxes=_per_image(boxes),
                   scores=_per_image(scores))

    @classmethod
    def detections(cls, boxes: Sequence[Maps], classes: Sequence[Maps],
                   scores: Optional[Sequence[Maps]] = None) -> Prediction:
        """Per image: boxes (n, 4) xyxy canvas pixels, classes (n,), optional scores (n,)."""
        return cls(BOXES, boxes=_per_image(boxes), cls=_per_image(classes), scores=_per_image(scores))


@dataclass
class PanelRow:
    """One head in a panel: the student's prediction, the teacher's (None: the teacher has no
    output for this head, drawn as "no teacher output") and the ground truth (None: not drawn).
    ``class_names`` label boxes (detection class ids index it)."""

    name: str
    student: Prediction
    teacher: Optional[Prediction] = None
    target: Optional[Prediction] = None
    class_names: Optional[Sequence[str]] = None


def no_class_maps(logits: torch.Tensor) -> None:
    """The :attr:`PictureContext.teacher_class_maps` of a picture drawn without output distillation."""
    return None


@dataclass
class PictureContext:
    """What the engine hands a task's ``picture_row`` besides the head's output and the batch.

    ``box_names`` detection class id -> name; ``semantic_names`` semantic index -> name (None without
    semantic labels); ``head_module`` the head (a promptable head decodes the ground-truth boxes with
    it; None when no model was bound); ``teacher_masks`` the box-prompted masks of the first teacher
    that has them on the student canvas (None: none this batch); ``teacher_class_maps(logits)`` ->
    (B, C, h, w) probabilities or None: per channel of a dense head's ``logits`` (B, C, h, w) the union
    of the teacher's masks of that channel's classes, as the head's output distillation pairs them
    (None when no output term pairs the head with a mask teacher that has masks this batch)."""

    box_names: Mapping[int, str]
    semantic_names: Optional[Mapping[int, str]] = None
    head_module: Any = None
    teacher_masks: Optional[Prediction] = None
    teacher_class_maps: Callable[[torch.Tensor], Optional[torch.Tensor]] = no_class_maps


def picture_detections(preds: torch.Tensor, nc: int, conf: float = 0.25, iou: float = 0.7) -> List[torch.Tensor]:
    """NMS for a picture (confident boxes only, at most 100 per image): per image (n, 6 + nm) on the CPU."""
    return [d.float().cpu() for d in non_max_suppression(preds, conf_thres=conf, iou_thres=iou, max_det=100, nc=nc)]
