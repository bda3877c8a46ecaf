"""The panoptic output of an instance head and a semantic head merged, and its PQ / SQ / RQ (the math;
:class:`vfmkd.engine.evaluation.panoptic_quality.PanopticScorer` wires it to a model's two heads).

**Merger** (:func:`merge_panoptic`, the rule of Panoptic FPN, Kirillov et al. 2019, as detectron2's
``combine_semantic_and_instance_outputs`` applies it; written here with torch ops). At the original
image resolution, ``ids`` starts all void (0), then:

1. *Things*, highest score first: an instance scoring below ``score_threshold`` (0.5) is dropped; of
   its mask, the pixels already taken by a higher-scoring instance are counted, and when they are
   more than ``overlap_threshold`` (0.5) of the mask the instance is dropped; otherwise its free
   pixels become a new segment (category = its detection class mapped by name to the panoptic thing
   category).
2. *Stuff*: per stuff category of the semantic head's argmax, its pixels not taken by a thing
   become a segment if there are at least ``stuff_area`` (4096, detectron2's COCO default, in
   original pixels) of them; smaller regions stay void.
3. Pixels the semantic head gives a *thing* class (or 0, unlabeled) and no instance covers stay
   void: things come from the instance head only (Panoptic FPN drops them likewise).

**Metric** (:class:`PanopticMeter`): torchmetrics' ``PanopticQuality`` (panopticapi's matching:
a predicted and a ground-truth segment of one category match when IoU > 0.5, unique by
construction; PQ = Σ IoU(TP) / (TP + ½FP + ½FN), SQ = Σ IoU(TP) / TP, RQ = TP / (TP + ½FP + ½FN)
per category, averaged over the categories with TP + FP + FN > 0; ``things`` / ``stuff`` average
over those subsets). Ground-truth void pixels (id 0) are void: a predicted segment's pixels on them
leave its union, and a predicted segment more than half on void is not a false positive. Two
choices keep it panopticapi's number:

- *Predicted void*: the merger's unassigned pixels are handed to the metric as a placeholder stuff
  category (:data:`UNASSIGNED`, never in the ground truth, left out of every average). They count in
  a ground-truth segment's union and cannot excuse a false negative, as in panopticapi; torchmetrics'
  own void handling would drop them from the union and skip a ground-truth segment that is mostly
  predicted void.
- *Crowd* ground-truth segments (``iscrowd`` 1) are void for every category. panopticapi discounts a
  crowd region only for predictions of the crowd's own category; the difference touches the few
  predictions of another category overlapping a crowd region (5 of 1,078 val segments are crowd).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from vfmkd.core.errors import ConfigError
from vfmkd.datasets.panoptic import VOID
from vfmkd.tasks.scoring.common import LOCAL_METRIC

if TYPE_CHECKING:
    from torchmetrics.detection import PanopticQuality

UNASSIGNED = 10_000  # placeholder category of predicted void pixels (above every COCO category id)

#: the parts of a panoptic output a task's head can give (``Task.panoptic_part``): things come from an
#: instance head's masks, stuff from a semantic head's class map
THINGS, STUFF = "things", "stuff"
#: the key of the panoptic scorer among a model's scorers, and of its numbers in an evaluation result
PANOPTIC = "panoptic"


@dataclass(frozen=True)
class MergeRule:
    """Thresholds of :func:`merge_panoptic` (defaults: detectron2's Panoptic FPN on COCO)."""

    score_threshold: float = 0.5
    overlap_threshold: float = 0.5
    stuff_area: int = 4096

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0 or not 0.0 <= self.overlap_threshold <= 1.0:
            raise ConfigError(f"panoptic merge: score_threshold ({self.score_threshold}) and overlap_threshold "
                              f"({self.overlap_threshold}) must lie in [0, 1]")
        if self.stuff_area < 0:
            raise ConfigError(f"panoptic merge: stuff_area must be >= 0 pixels, got {self.stuff_area}")


@dataclass(frozen=True)
class Segment:
    """One predicted segment: its id in ``ids``, category, thing or stuff, pixel count, score (things)."""

    id: int
    category_id: int
    isthing: bool
    area: int
    score: Optional[float] = None


@dataclass
class PanopticPrediction:
    """``ids`` (H, W) int64 segment id per pixel (0 = void) and the segments, ids 1..n."""

    ids: torch.Tensor
    segments: List[Segment]

    def metric_input(self) -> torch.Tensor:
        """(H, W, 2) int64 ``(category, segment id)``; void pixels get :data:`UNASSIGNED`."""
        cats = torch.tensor([UNASSIGNED] + [s.category_id for s in self.segments], dtype=torch.int64)
        return torch.stack([cats[self.ids], self.ids], -1)


def merge_panoptic(masks: torch.Tensor, scores: torch.Tensor, categories: torch.Tensor, semantic: torch.Tensor,
                   stuff_ids: Sequence[int] | Set[int], rule: MergeRule = MergeRule()) -> PanopticPrediction:
    """Things from instances, stuff from the semantic map (the rule in the module docstring).

    ``masks`` (n, H, W) bool instance masks, ``scores`` (n,), ``categories`` (n,) panoptic thing
    category ids; ``semantic`` (H, W) panoptic category id per pixel (the semantic argmax mapped to
    category ids; 0 = unlabeled); ``stuff_ids`` the stuff category ids."""
    h, w = semantic.shape[-2:]
    ids = torch.zeros((h, w), dtype=torch.int64, device=semantic.device)
    segments: List[Segment] = []
    masks = masks.bool().view(-1, h, w)
    for j in torch.argsort(scores.float(), descending=True, stable=True).tolist():
        score = float(scores[j])
        if score < rule.score_threshold:
            break
        mask = masks[j]
        area = int(mask.sum())
        if area == 0:
            continue
        free = mask & (ids == VOID)
        kept = int(free.sum())
        if (area - kept) / area > rule.overlap_threshold or kept == 0:
            continue
        segments.append(Segment(len(segments) + 1, int(categories[j]), True, kept, score))
        ids[free] = segments[-1].id
    stuff = {int(c) for c in stuff_ids}
    for cat in torch.unique(semantic).tolist():
        if int(cat) not in stuff:
            continue  # void / unlabeled, and thing classes no instance explains
        region = (semantic == cat) & (ids == VOID)
        area = int(region.sum())
        if area < max(rule.stuff_area, 1):
            continue
        segments.append(Segment(len(segments) + 1, int(cat), False, area))
        ids[region] = segments[-1].id
    return PanopticPrediction(ids, segments)


def quality(iou_sum: torch.Tensor, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor,
            select: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, float]]:
    """Per-category PQ, SQ, RQ of the metric's states and their means over ``select`` (bool per
    category) restricted to categories with TP + FP + FN > 0 (NaN when none)."""
    tp_f, denom = tp.double(), tp.double() + 0.5 * fp.double() + 0.5 * fn.double()
    sq = torch.where(tp_f > 0, iou_sum.double() / tp_f.clamp(min=1), torch.zeros_like(tp_f))
    rq = torch.where(denom > 0, tp_f / denom.clamp(min=1e-12), torch.zeros_like(tp_f))
    pq = sq * rq
    use = select & (denom > 0)
    if not bool(use.any()):
        nan = float("nan")
        return pq, sq, rq, {"PQ": nan, "SQ": nan, "RQ": nan, "categories": 0}
    return pq, sq, rq, {"PQ": float(pq[use].mean()), "SQ": float(sq[use].mean()), "RQ": float(rq[use].mean()),
                        "categories": int(use.sum())}


def _member(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``torch.isin(x, ids)`` for small non-negative ids by a lookup table (isin sorts: ~0.4 s a 640 x 480 map)."""
    top = int(ids.max()) if len(ids) else 0
    lut = torch.zeros(top + 1, dtype=torch.bool)
    lut[ids] = True
    return (x >= 0) & (x <= top) & lut[x.clamp(0, top)]


def _colours(
    x: torch.Tensor, things: torch.Tensor, stuffs: torch.Tensor, void: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) (category, instance) -> (N,) category and instance as torchmetrics prepares them: a
    stuff's instance is 0, an unknown category is the void colour (void, 0)."""
    cat, inst = x[:, 0], x[:, 1]
    stuff, known = _member(cat, stuffs), _member(cat, torch.cat([things, stuffs]))
    return torch.where(known, cat, torch.full_like(cat, void)), torch.where(
        known & ~stuff, inst, torch.zeros_like(inst)
    )


def segment_stats(pred: torch.Tensor, target: torch.Tensor, metric: PanopticQuality) -> Tuple[torch.Tensor, ...]:
    """Per-category IoU sum, TP, FP, FN of one image, by the rule of torchmetrics'
    ``PanopticQuality.update`` (panopticapi's matching; see the module docstring), with flat integer
    segment keys: its ``torch.unique(dim=0)`` over (pixels, 2) takes seconds per 640 x 480 image on a
    CPU, this a few milliseconds. ``pred``, ``target`` (H, W, 2); the result is what ``update`` adds to
    the metric's states (tested against it)."""
    void = int(metric.void_color[0])
    things = torch.tensor(sorted(metric.things), dtype=torch.int64)
    stuffs = torch.tensor(sorted(metric.stuffs), dtype=torch.int64)
    if not metric.allow_unknown_preds_category:
        known = _member(pred[..., 0], torch.cat([things, stuffs]))
        if not bool(known.all()):
            raise ValueError(f"Unknown categories found: {torch.unique(pred[..., 0][~known]).tolist()}")
    pc, pi = _colours(pred.reshape(-1, 2).long(), things, stuffs, void)
    tc, ti = _colours(target.reshape(-1, 2).long(), things, stuffs, void)
    # one key per (category, instance) colour, compacted to 0..n-1 per side
    span = int(max(int(pi.max()) if len(pi) else 0, int(ti.max()) if len(ti) else 0)) + 1
    p_keys, p_idx = torch.unique(pc * span + pi, return_inverse=True)
    t_keys, t_idx = torch.unique(tc * span + ti, return_inverse=True)
    p_area, t_area = torch.bincount(p_idx, minlength=len(p_keys)), torch.bincount(t_idx, minlength=len(t_keys))
    pair, inter = torch.unique(p_idx * len(t_keys) + t_idx, return_counts=True)
    pp, tt = (pair // len(t_keys)).tolist(), (pair % len(t_keys)).tolist()
    inter_of = dict(zip(zip(pp, tt), inter.tolist()))
    p_cat, t_cat = (p_keys // span).tolist(), (t_keys // span).tolist()
    void_key = void * span
    p_void = int((p_keys == void_key).nonzero()[0]) if bool((p_keys == void_key).any()) else -1
    t_void = int((t_keys == void_key).nonzero()[0]) if bool((t_keys == void_key).any()) else -1
    cont = metric.cat_id_to_continuous_id
    n = len(cont)
    iou_sum = torch.zeros(n, dtype=torch.double)
    tp, fp, fn = (torch.zeros(n, dtype=torch.int) for _ in range(3))
    matched_p, matched_t = set(), set()
    for (a, b), i in inter_of.items():
        if b == t_void or p_cat[a] != t_cat[b]:
            continue
        union = (int(p_area[a]) - inter_of.get((a, t_void), 0) + int(t_area[b]) - inter_of.get((p_void, b), 0) - i)
        iou = i / union
        if iou > 0.5:
            matched_p.add(a)
            matched_t.add(b)
            iou_sum[cont[t_cat[b]]] += iou
            tp[cont[t_cat[b]]] += 1
    for b in range(len(t_keys)):
        if b != t_void and b not in matched_t and inter_of.get((p_void, b), 0) / int(t_area[b]) <= 0.5:
            fn[cont[t_cat[b]]] += 1
    for a in range(len(p_keys)):
        if a != p_void and a not in matched_p and inter_of.get((a, t_void), 0) / int(p_area[a]) <= 0.5:
            fp[cont[p_cat[a]]] += 1
    return iou_sum, tp, fp, fn


class PanopticMeter:
    """torchmetrics' ``PanopticQuality`` over (category, segment id) maps, with the things / stuff /
    all means and per-category numbers (:meth:`result`). ``things``/``stuffs``: category ids.
    ``exact``: feed the metric through its own ``update`` (slow on CPU: seconds per image) instead of
    :func:`segment_stats` (the same numbers, tested)."""

    def __init__(self, things: Sequence[int], stuffs: Sequence[int], names: Optional[Mapping[int, str]] = None,
                 exact: bool = False) -> None:
        self.things, self.stuffs = sorted(int(t) for t in things), sorted(int(s) for s in stuffs)
        # imported here: torchmetrics' package import loads transformers when installed (~1 s per process)
        from torchmetrics.detection import PanopticQuality

        self.metric = PanopticQuality(things=set(self.things), stuffs=set(self.stuffs) | {UNASSIGNED},
                                      return_sq_and_rq=True, **LOCAL_METRIC)
        self.names, self.exact = dict(names or {}), exact

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``, ``target`` (H, W, 2) or (B, H, W, 2) int64 (category, segment id); target
        categories outside things/stuffs (0) are void; predicted void = :data:`UNASSIGNED`."""
        if pred.dim() == 3:
            pred, target = pred[None], target[None]
        pred, target = pred.long().cpu(), target.long().cpu()
        if self.exact:
            self.metric.update(pred, target)
            return
        m = self.metric
        for p, t in zip(pred, target):
            iou_sum, tp, fp, fn = segment_stats(p, t, m)
            m.iou_sum += iou_sum
            m.true_positives += tp
            m.false_positives += fp
            m.false_negatives += fn
        m._update_count += 1  # states changed outside update(): compute() must not warn that it never ran

    def result(self) -> Dict[str, Any]:
        m = self.metric
        order = sorted(m.cat_id_to_continuous_id, key=m.cat_id_to_continuous_id.get)  # continuous id -> category
        cats = torch.tensor(order)
        real = cats != UNASSIGNED
        things = torch.tensor([c in set(self.things) for c in order]) & real
        iou, tp, fp, fn = m.iou_sum.cpu(), m.true_positives.cpu(), m.false_positives.cpu(), m.false_negatives.cpu()
        pq, sq, rq, total = quality(iou, tp, fp, fn, real)
        _, _, _, thing = quality(iou, tp, fp, fn, things)
        _, _, _, stuff = quality(iou, tp, fp, fn, real & ~things)
        per_class = {}
        for k, c in enumerate(order):
            if c != UNASSIGNED and int(tp[k] + fp[k] + fn[k]) > 0:
                per_class[self.names.get(c, str(c))] = {
                    "PQ": float(pq[k]), "SQ": float(sq[k]), "RQ": float(rq[k]), "TP": int(tp[k]), "FP": int(fp[k]),
                    "FN": int(fn[k]), "thing": bool(things[k])}
        out: Dict[str, Any] = {"PQ": total["PQ"], "SQ": total["SQ"], "RQ": total["RQ"]}
        for tag, part in (("things", thing), ("stuff", stuff)):
            out.update({f"PQ_{tag}": part["PQ"], f"SQ_{tag}": part["SQ"], f"RQ_{tag}": part["RQ"]})
        out.update(categories=total["categories"], categories_things=thing["categories"],
                   categories_stuff=stuff["categories"], per_class_pq=per_class)
        return out
