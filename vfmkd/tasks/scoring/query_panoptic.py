"""Panoptic inference from a query head's output and its scorer (PQ / SQ / RQ all, things, stuff, and the
mIoU of the panoptic class map), at the original image resolution.

**Inference** (:func:`query_panoptic`, Mask2Former's ``panoptic_inference`` with RapSAM's IoU score):
a query's score is its best class probability (no-object and index 0, unlabeled, left out) times its
predicted IoU (``use_iou``); queries scoring below ``score_threshold`` are dropped; every pixel goes
to the kept query with the highest ``score x mask probability``; a query keeps the pixels it wins
where its own mask probability is at least ``mask_threshold``, and is dropped when those are fewer
than ``overlap_threshold`` of its own mask (the rest is taken by better queries) or fewer than
``min_area`` pixels. Things give one segment per query; stuff queries of one class merge into one
segment. Unassigned pixels are void.

**Metric**: :class:`~vfmkd.tasks.scoring.panoptic_metrics.PanopticMeter` (torchmetrics' panoptic
quality with panopticapi's void rules) against the split's COCO panoptic annotations, the same as the
instance + semantic merge is scored with, so the two heads' PQ compare.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from vfmkd.core.errors import ConfigError, DatasetError
from vfmkd.datasets.masks import SemanticClassTable
from vfmkd.datasets.panoptic import PanopticAnnotationError, PanopticAnnotations
from vfmkd.datasets.records import Batch
from vfmkd.tasks.scoring.common import LOCAL_METRIC, unletterbox, upsampled
from vfmkd.tasks.scoring.panoptic_metrics import PanopticMeter, PanopticPrediction, Segment

LOGGER = logging.getLogger("vfmkd")
PQ_KEYS = ("PQ", "SQ", "RQ", "PQ_things", "SQ_things", "RQ_things", "PQ_stuff", "SQ_stuff", "RQ_stuff")


@dataclass(frozen=True)
class QueryPanopticRule:
    """Thresholds of :func:`query_panoptic` (the head's ``score_threshold``, ``overlap_threshold``,
    ``mask_threshold``, ``min_area``, ``use_iou``; defaults: Mask2Former's overlap 0.8)."""

    score_threshold: float = 0.5
    overlap_threshold: float = 0.8
    mask_threshold: float = 0.5
    min_area: int = 0
    use_iou: bool = True

    def __post_init__(self) -> None:
        for key in ("score_threshold", "overlap_threshold", "mask_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"query panoptic inference: {key} must lie in [0, 1], got {getattr(self, key)}")
        if self.min_area < 0:
            raise ConfigError(f"query panoptic inference: min_area must be >= 0 pixels, got {self.min_area}")


def query_scores(class_logits: torch.Tensor, iou: torch.Tensor, use_iou: bool = True):
    """(..., Q, C + 1) class logits and (..., Q) IoU -> (score (..., Q), class index (..., Q)): the best
    class probability (no-object and index 0 excluded), times the IoU with ``use_iou``."""
    probs = class_logits.float().softmax(-1)[..., 1:-1]
    score, label = probs.max(-1)
    return (score * iou.float() if use_iou else score), label + 1


def query_panoptic(class_logits: torch.Tensor, mask_logits: torch.Tensor, iou: torch.Tensor,
                   is_thing: Optional[torch.Tensor], rule: QueryPanopticRule = QueryPanopticRule(),
                   to_map: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> PanopticPrediction:
    """One image's panoptic prediction (the rule in the module docstring): ``class_logits`` (Q, C + 1),
    ``mask_logits`` (Q, h, w), ``iou`` (Q,); ``is_thing`` (C,) bool per class index (None: every class
    a thing, no merging); ``to_map`` carries the kept queries' (n, h, w) logits into the output frame
    (upsampling, un-letterboxing; default as they are). Segments' ``category_id`` is the class index."""
    score, label = query_scores(class_logits, iou, rule.use_iou)
    keep = (score >= rule.score_threshold).nonzero().view(-1)
    segments: List[Segment] = []
    if len(keep) == 0:  # nothing confident: all void, on the mask grid (the caller sizes it)
        return PanopticPrediction(torch.zeros(mask_logits.shape[-2:], dtype=torch.int64), segments)
    logits = mask_logits[keep].float()
    probs = (to_map(logits) if to_map is not None else logits).sigmoid().cpu()
    ids = torch.zeros(probs.shape[-2:], dtype=torch.int64)
    score, label = score[keep].cpu(), label[keep].cpu()
    owner = (score[:, None, None] * probs).argmax(0)
    stuff_segment: Dict[int, int] = {}
    for k in torch.argsort(score, descending=True, stable=True).tolist():
        own = probs[k] >= rule.mask_threshold
        area = int(own.sum())
        won = own & (owner == k)
        kept = int(won.sum())
        if area == 0 or kept == 0 or kept < rule.min_area or kept / area < rule.overlap_threshold:
            continue
        cls = int(label[k])
        thing = True if is_thing is None else bool(is_thing[cls])
        if not thing and cls in stuff_segment:  # stuff of one class is one segment
            sid = stuff_segment[cls]
            old = segments[sid - 1]
            segments[sid - 1] = Segment(sid, cls, False, old.area + kept)
        else:
            sid = len(segments) + 1
            segments.append(Segment(sid, cls, thing, kept, float(score[k]) if thing else None))
            if not thing:
                stuff_segment[cls] = sid
        ids[won] = sid
    return PanopticPrediction(ids, segments)


def class_map(pred: PanopticPrediction) -> torch.Tensor:
    """(H, W) int64 class index per pixel of a panoptic prediction (0 where void)."""
    cats = torch.tensor([0] + [s.category_id for s in pred.segments], dtype=torch.int64)
    return cats[pred.ids]


class QueryPanopticScorer:
    """PQ / SQ / RQ (all, things, stuff) of a query head's panoptic inference against the split's COCO
    panoptic annotations, and ``mIoU`` (torchmetrics' Jaccard, index 0 ignored, over the classes present)
    of its class map against the semantic labels; both at the original image resolution.

    ``names``: semantic index -> name (index 0 included); ``data_root``/``split`` locate the panoptic
    annotations (without them, or when the split has none, the PQ keys are NaN and ``mIoU`` still
    counts); ``rule``: the inference thresholds (replaced by the head's own settings in :meth:`bind`).
    Images without a panoptic annotation are counted (``unlabelled``), inconsistent ones skipped and
    named (``skipped_images``), as by the instance + semantic scorer."""

    def __init__(self, head: str, names: Mapping[int, str], data_root: Optional[str | Path], split: Optional[str],
                 rule: QueryPanopticRule = QueryPanopticRule(), *, read_output: Callable[[Any], Any]) -> None:
        self.head, self.rule, self.read_output = head, rule, read_output
        self.num_classes = len(names)
        # imported here: torchmetrics' package import loads transformers when installed (~1 s per process)
        from torchmetrics.classification import MulticlassJaccardIndex

        self.jaccard = MulticlassJaccardIndex(self.num_classes, average=None, ignore_index=0, **LOCAL_METRIC)
        self.annotations: Optional[PanopticAnnotations] = None
        self.is_thing = torch.zeros(self.num_classes, dtype=torch.bool)
        self.index_to_category = torch.zeros(self.num_classes, dtype=torch.int64)
        if data_root is not None and split is not None:
            try:
                self.annotations = PanopticAnnotations(data_root, split)
            except DatasetError as exc:
                LOGGER.info("no PQ for head %s: %s", head, exc)
        if self.annotations is not None:
            ids = SemanticClassTable.load(Path(data_root)).ids
            known = set(self.annotations.categories)
            for k, cid in enumerate(list(ids)[: self.num_classes]):
                self.index_to_category[k] = int(cid) if int(cid) in known else 0
                self.is_thing[k] = int(cid) in self.annotations.things
            self.meter = PanopticMeter(sorted(self.annotations.things), sorted(self.annotations.stuffs),
                                       self.annotations.names)
        self.images = self.unlabelled = 0
        self.skipped_images: Dict[str, str] = {}

    def bind(self, model: Any) -> None:
        """The head's inference thresholds (its ``panoptic_settings``), when it has them."""
        settings = getattr(model.heads[self.head], "panoptic_settings", None)
        self.rule = QueryPanopticRule(**settings) if settings else self.rule

    def _panoptic(self, pred: PanopticPrediction, image_id: str, orig_hw: tuple) -> None:
        if self.annotations is None:
            return
        if image_id not in self.annotations:
            self.unlabelled += 1
            return
        try:
            target = self.annotations.load(image_id)
        except PanopticAnnotationError as exc:
            self.skipped_images.setdefault(image_id, exc.reason)
            return
        if target.ids.shape != orig_hw:
            self.skipped_images.setdefault(image_id, f"the panoptic PNG is {target.ids.shape}, the image {orig_hw}")
            return
        mapped = PanopticPrediction(pred.ids, [Segment(s.id, int(self.index_to_category[s.category_id]), s.isthing,
                                                       s.area, s.score) for s in pred.segments])
        self.meter.update(mapped.metric_input(), torch.from_numpy(target.metric_input()))
        self.images += 1

    def update(self, out: Any, batch: Batch) -> None:
        rec = self.read_output(out.heads[self.head])
        canvas = tuple(batch.images.shape[-2:])
        for i, image_id in enumerate(batch.image_ids):
            def to_map(logits: torch.Tensor, i: int = i) -> torch.Tensor:
                return unletterbox(upsampled(logits[None], canvas)[0].cpu(), batch, i)

            pred = query_panoptic(rec.class_logits[i], rec.mask_logits[i], rec.iou[i], self.is_thing, self.rule, to_map)
            orig_hw = tuple(int(v) for v in batch.views.orig_hw[i].tolist())
            if pred.ids.shape != orig_hw:  # no query kept: an empty map of the canvas size
                pred = PanopticPrediction(torch.zeros(orig_hw, dtype=torch.int64), [])
            if batch.semantic is not None:
                target = unletterbox(batch.semantic[i].long().cpu(), batch, i)
                self.jaccard.update(class_map(pred).view(1, -1), target.view(1, -1))
            self._panoptic(pred, image_id, orig_hw)

    def result(self) -> Dict[str, Any]:
        nan = float("nan")
        out: Dict[str, Any] = self.meter.result() if self.images else {**{k: nan for k in PQ_KEYS},
                                                                        "per_class_pq": {}}
        confmat = self.jaccard.confmat
        present = [k for k in range(1, self.num_classes) if int(confmat[k].sum() + confmat[:, k].sum()) > 0]
        ious = self.jaccard.compute() if present else None
        out["mIoU"] = float(sum(float(ious[k]) for k in present) / len(present)) if present else nan
        out.update(images=self.images, skipped=len(self.skipped_images), skipped_images=dict(self.skipped_images),
                   unlabelled=self.unlabelled)
        return out
