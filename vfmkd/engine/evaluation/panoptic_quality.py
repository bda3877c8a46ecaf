"""The panoptic scorer of a student with an instance head and a semantic head: PQ / SQ / RQ of their
merged output against the split's COCO panoptic annotations. The merger and the metric are
:mod:`vfmkd.tasks.scoring.panoptic_metrics` (its docstring gives the rules); this module finds the two heads,
reads their outputs per image and draws the first batch."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import process_mask

from vfmkd.core.errors import ConfigError, DatasetError
from vfmkd.datasets.masks import InstanceClassTable, SemanticClassTable
from vfmkd.datasets.panoptic import PanopticAnnotationError, PanopticAnnotations
from vfmkd.datasets.records import Batch
from vfmkd.models.unified_model import StudentOutput
from vfmkd.tasks import Task
from vfmkd.tasks.scoring.common import unletterbox, upsampled
from vfmkd.tasks.scoring.panoptic_metrics import (
    STUFF,
    THINGS,
    UNASSIGNED,
    MergeRule,
    PanopticMeter,
    PanopticPrediction,
    merge_panoptic,
)

LOGGER = logging.getLogger("vfmkd")


def panoptic_heads(tasks: Mapping[str, Task]) -> Tuple[Optional[str], Optional[str]]:
    """The first head whose task gives the things and the first whose task gives the stuff of a panoptic
    output (``Task.panoptic_part``; ``tasks``: head -> task)."""
    things = next((h for h, t in tasks.items() if t.panoptic_part == THINGS), None)
    stuff = next((h for h, t in tasks.items() if t.panoptic_part == STUFF), None)
    return things, stuff


def require_panoptic_heads(tasks: Mapping[str, Task]) -> Tuple[str, str]:
    """Both heads a panoptic output needs, or a ConfigError naming the missing one(s)."""
    instance, semantic = panoptic_heads(tasks)
    missing = [what for what, head in (("an instance head (type yolo_seg_head: the things)", instance),
                                       ("a semantic head (type semantic_head: the stuff)", semantic)) if head is None]
    if missing:
        heads = ", ".join(f"{h} ({t.name})" for h, t in tasks.items()) or "none"
        raise ConfigError(f"panoptic evaluation needs {' and '.join(missing)} in model.heads; the model has: {heads}")
    return instance, semantic  # type: ignore[return-value]


class PanopticScorer:
    """PQ, SQ, RQ (all / things / stuff) of the merged instance + semantic outputs against the
    split's COCO panoptic annotations, at the original image resolution (the interface of
    :class:`vfmkd.engine.evaluation.evaluator.DetectionScorer`).

    ``read_instance`` / ``read_semantic``: the heads' tasks' ``read_output`` (an instance output with
    ``predictions`` and ``proto``, a semantic output with ``logits``).

    Per image: NMS of the instance head (``nms_iou``, ``max_det``; candidates below the rule's
    score threshold never enter) and ``process_mask`` at the canvas, the semantic logits resized to
    the canvas (bilinear) and argmax'd, both un-letterboxed (:func:`unletterbox`), detection classes
    mapped to panoptic categories by name (``InstanceClassTable``), semantic indices to category ids
    (``SemanticClassTable``), merged (:func:`merge_panoptic`) and scored against the ground truth
    the scorer reads itself by image id (:class:`PanopticAnnotations`). Images without a panoptic
    annotation are counted (``unlabelled``); an inconsistent annotation is skipped, counted
    (``skipped``) and named with its reason (``skipped_images``, logged once per image).

    With ``draw_to`` (a PNG path) the first batch's images (up to ``draw_images``) are drawn:
    input, ground truth, prediction, prediction on the input (:mod:`vfmkd.engine.pictures.panoptic_vis`).

    ``result()``: ``PQ``, ``SQ``, ``RQ``, ``PQ_things`` ... ``RQ_stuff``, category counts,
    ``per_class_pq`` {name: PQ, SQ, RQ, TP, FP, FN, thing}, ``images``, ``skipped``,
    ``skipped_images``, ``unlabelled``.
    """

    def __init__(self, instance_head: str, semantic_head: str, dataset_root: str | Path, split: str,
                 box_names: Mapping[int, str], rule: Optional[MergeRule] = None, nms_iou: float = 0.7,
                 max_det: int = 100, draw_to: Optional[str | Path] = None, draw_images: int = 4, *,
                 read_instance: Callable[[Any], Any], read_semantic: Callable[[Any], Any]) -> None:
        self.instance_head, self.semantic_head = instance_head, semantic_head
        self.read_instance, self.read_semantic = read_instance, read_semantic  # the two heads' tasks' readers
        self.rule = rule if rule is not None else MergeRule()  # detectron2's COCO defaults
        self.nms_iou, self.max_det, self.nc = nms_iou, max_det, len(box_names)
        self.annotations = PanopticAnnotations(dataset_root, split)
        table = InstanceClassTable.load(Path(dataset_root), self.nc)
        to_category = torch.full((self.nc,), UNASSIGNED, dtype=torch.int64)
        for pid, det in table.to_detection.items():
            if det < self.nc and pid in self.annotations.things:
                to_category[det] = pid
        self.to_category = to_category  # detection class -> panoptic thing category (UNASSIGNED: none)
        self.semantic_table = SemanticClassTable.load(Path(dataset_root))
        ids = torch.tensor(self.semantic_table.ids, dtype=torch.int64)
        known = set(self.annotations.categories)
        self.index_to_category = torch.where(torch.tensor([int(i) in known for i in ids.tolist()]), ids,
                                             torch.zeros_like(ids))  # contiguous index -> category id (0: void)
        self.meter = PanopticMeter(sorted(self.annotations.things), sorted(self.annotations.stuffs),
                                   self.annotations.names)
        self.draw_to, self.draw_images = (Path(draw_to) if draw_to else None), int(draw_images)
        self.written: List[Path] = []
        self.images = self.unlabelled = 0
        self.skipped_images: Dict[str, str] = {}

    def _skip(self, image_id: str, reason: str) -> None:
        if image_id not in self.skipped_images:
            LOGGER.warning("panoptic: image %s skipped (%s)", image_id, reason)
        self.skipped_images[image_id] = reason

    def predict(self, out: StudentOutput, batch: Batch, i: int, dets: torch.Tensor, proto: torch.Tensor,
                semantic_logits: torch.Tensor) -> PanopticPrediction:
        """The merged panoptic prediction of batch item ``i`` at its original resolution."""
        canvas = (batch.images.shape[2], batch.images.shape[3])
        det = dets.float().cpu()
        if self.rule.score_threshold > 0:
            det = det[det[:, 4] >= self.rule.score_threshold]
        h, w = (int(v) for v in batch.views.orig_hw[i].tolist())
        if len(det):
            masks = process_mask(proto.float().cpu(), det[:, 6:], det[:, :4], shape=canvas, upsample=True)
            masks = unletterbox(masks, batch, i).bool()
        else:
            masks = torch.zeros((0, h, w), dtype=torch.bool)
        cats = self.to_category[det[:, 5].long()] if len(det) else torch.zeros(0, dtype=torch.int64)
        keep = cats != UNASSIGNED
        index = upsampled(semantic_logits[None], canvas).argmax(1)[0].cpu()
        semantic = self.index_to_category[unletterbox(index, batch, i)]
        return merge_panoptic(masks[keep], det[keep, 4], cats[keep], semantic, self.annotations.stuffs, self.rule)

    def update(self, out: StudentOutput, batch: Batch) -> None:
        things = self.read_instance(out.heads[self.instance_head])
        preds, proto = things.predictions, things.proto
        logits = self.read_semantic(out.heads[self.semantic_head]).logits
        if logits.shape[1] != len(self.index_to_category):
            raise ValueError(f"PanopticScorer: the semantic head '{self.semantic_head}' has {logits.shape[1]} classes, "
                             f"the semantic table {self.semantic_table.source} {len(self.index_to_category)} (index 0 "
                             "included)")
        dets = non_max_suppression(preds, conf_thres=max(self.rule.score_threshold, 1e-3), iou_thres=self.nms_iou,
                                   max_det=self.max_det, nc=self.nc)
        drawn: List[Tuple[Any, ...]] = []
        for i, image_id in enumerate(batch.image_ids):
            if image_id not in self.annotations:
                self.unlabelled += 1
                continue
            try:
                target = self.annotations.load(image_id)
            except PanopticAnnotationError as exc:
                self._skip(image_id, exc.reason)
                continue
            orig_hw = tuple(int(v) for v in batch.views.orig_hw[i].tolist())
            if target.ids.shape != orig_hw:
                self._skip(image_id, f"the panoptic PNG is {target.ids.shape[1]}x{target.ids.shape[0]} (w x h), the "
                                     f"image {orig_hw[1]}x{orig_hw[0]}")
                continue
            pred = self.predict(out, batch, i, dets[i], proto[i], logits[i])
            gt = torch.from_numpy(target.metric_input())
            self.meter.update(pred.metric_input(), gt)
            self.images += 1
            if self.draw_to is not None and not self.written and len(drawn) < self.draw_images:
                image = unletterbox(batch.images[i].float().cpu(), batch, i).permute(1, 2, 0).numpy()
                drawn.append((image_id, image, target, pred))
        if drawn and self.draw_to is not None:
            from vfmkd.engine.pictures.panoptic_vis import render_panoptic

            self.written.append(render_panoptic(self.draw_to, drawn, self.annotations.names))

    def result(self) -> Dict[str, Any]:
        if self.images:
            out = self.meter.result()
        else:
            nan = float("nan")
            out = {k: nan for k in ("PQ", "SQ", "RQ", "PQ_things", "SQ_things", "RQ_things", "PQ_stuff", "SQ_stuff",
                                    "RQ_stuff")}
            out.update(per_class_pq={})
        out.update(images=self.images, skipped=len(self.skipped_images), skipped_images=dict(self.skipped_images),
                   unlabelled=self.unlabelled)
        return out


def build_panoptic_scorer(tasks: Mapping[str, Task], box_names: Mapping[int, str], data_root: Optional[str | Path],
                          split: Optional[str], panoptic: Optional[bool] = None,
                          **kwargs: Any) -> Optional[PanopticScorer]:
    """The panoptic scorer of a model (``tasks``: head -> task). ``panoptic`` None: automatic, built
    when the model has a things head and a stuff head (an instance and a semantic head) and the split has
    panoptic annotations (otherwise None, with a log line when only the annotations are missing); True:
    required, a missing head is a ConfigError naming it (missing annotations a DatasetError); False: off."""
    if panoptic is False:
        return None
    instance, semantic = require_panoptic_heads(tasks) if panoptic else panoptic_heads(tasks)
    if panoptic and (data_root is None or split is None):
        raise ConfigError("panoptic evaluation needs the dataset root and split (its panoptic annotations)")
    if instance is None or semantic is None or data_root is None or split is None:
        return None
    try:
        return PanopticScorer(instance, semantic, data_root, split, box_names,
                              read_instance=tasks[instance].read_output, read_semantic=tasks[semantic].read_output,
                              **kwargs)
    except DatasetError as exc:
        if panoptic:
            raise
        LOGGER.info("no panoptic evaluation of heads %s + %s: %s", instance, semantic, exc)
        return None
