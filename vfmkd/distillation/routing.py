"""The one owner of the offline/online policy.

Per teacher it answers, once per run, "does a live model have to be loaded, and why", and per
batch "cached targets or a live pass, and why", from the same predicates, so a batch can only be
routed live when its live model exists. Semantics (docs/distillation.md, its routing table):

* ``offline: false`` -> every batch live; no cache is opened.
* ``offline: true`` with ``offline_ratio`` 0.0 -> a pure live run; no cache is needed.
* ``offline: true`` with ``offline_ratio`` r > 0 -> the cache is required (or, with
  ``missing_cache: online``, absent images/splits go live); each batch reads it with probability r
  unless one of its views cannot be carried onto the cached grids (the view gates below).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

import numpy as np
import torch

from vfmkd.core.config import check_offline_ratio
from vfmkd.datasets.records import Batch, ViewGeometry
from vfmkd.datasets.transforms import GeometricAugment
from vfmkd.distillation.offline_distiller import OfflineTeacher
from vfmkd.distillation.online_distiller import OnlineTeacher
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.utils.logging import get_logger

InputAffine = Callable[[int, int, int], Tuple[float, float, float, float]]


@dataclass
class TeacherSource:
    """One enabled teacher as the router sees it. ``cache``: its cache of the split (None when the
    run needs none or it is absent and allowed to be); ``missing``: image ids the cache lacks;
    ``input_affine``: the teacher's preprocessing geometry (predicts how a live pass sees a view);
    ``load_live``: builds the :class:`OnlineTeacher` (called only when a live pass can occur)."""

    name: str
    offline: bool
    cache: Optional[OfflineTeacher]
    input_affine: InputAffine
    load_live: Callable[[], OnlineTeacher]
    missing: FrozenSet[str] = frozenset()
    why_no_cache: str = ""
    live: Optional[OnlineTeacher] = None


@dataclass(frozen=True)
class Route:
    """``mode``: ``offline`` (cached targets), ``online`` (a live pass) or ``skipped`` (validation: the
    cache lacks the batch's images); ``reason`` says why online or skipped."""

    mode: str
    reason: str = ""


def offline_draw(seed: int, step: int, teacher_index: int, rank: int = 0) -> float:
    """The reproducible uniform draw in [0, 1) of a (step, teacher) on a rank: offline when <
    offline_ratio. Rank 0 draws what a single process draws; every other rank has its own stream."""
    key = (seed, step, teacher_index) if rank == 0 else (seed, step, teacher_index, rank)
    return float(np.random.default_rng(key).random())


def live_view_shift(view: ViewGeometry, cached_affine: torch.Tensor, input_size: int,
                    input_affine: InputAffine) -> float:
    """Largest displacement, as a fraction of the teacher canvas, between where the cached pass saw
    a visible image point and where a live pass on this view would see it (the live pass feeds the
    view's content box to the teacher's own preprocessing, ``input_affine``). 0 for a plain
    letterbox; grows with zoom and with crops that move the image in the teacher's frame."""
    x1, y1, x2, y2 = view.content_box
    live = input_affine(max(y2 - y1, 1), max(x2 - x1, 1), input_size)
    worst = 0.0
    for axis, (lo, hi) in enumerate(((x1, x2), (y1, y2))):
        s, o = view.matrix[axis, axis], view.matrix[axis, 2]
        t, to = float(cached_affine[axis]), float(cached_affine[axis + 2])
        for edge in (lo, hi):  # displacement is linear in x: its extremes are at the visible edges
            x = (edge - o) / s  # original coordinate of this edge of the visible region
            worst = max(worst, abs(live[axis] * (s * x + o - lo) + live[axis + 2] - (t * x + to)))
    return worst / input_size


@dataclass
class ViewGates:
    """Which views of a run cannot be carried onto a cached grid (ViT maps are neither flip- nor
    scale- nor shift-equivariant and see global context). Each gate is active only when the
    augmentation can produce such a view, which is also what makes a live model necessary."""

    rotation: bool = False
    flip: bool = False  # flips and the cache has no flipped pass
    crop: bool = False  # crops lose context the cached map saw (unless offline_crops)
    shift: bool = False  # views a live pass would see displaced beyond offline_max_shift

    @classmethod
    def of(cls, augment: Optional[GeometricAugment], has_flip: bool, offline_crops: bool) -> ViewGates:
        if augment is None or not augment.enabled:
            return cls()  # a plain letterbox is exactly what the cache was written for
        zoom_or_move = augment.scale > 0 or augment.translate > 0
        return cls(rotation=augment.degrees > 0, flip=augment.fliplr > 0 and not has_flip,
                   crop=zoom_or_move and not offline_crops, shift=zoom_or_move)

    def why_live(self) -> str:
        reasons = [
            r
            for on, r in (
                (self.rotation, "rotation augmentation has no offline path"),
                (self.flip, "flip augmentation and the cache has no flipped pass"),
                (
                    self.crop or self.shift,
                    "scale/translate views beyond "
                    "distillation.offline_max_shift or crops "
                    "(offline_crops=false) go live",
                ),
            )
            if on
        ]
        return "; ".join(reasons)


class TeacherRouter:
    """Routes every distilled teacher of every batch to its cache or its live model.

    ``targets(step, batch, cached)`` returns the :class:`TeacherTargets` of each teacher in
    ``teachers`` for the batch and counts every route with its reason (``summary()``). With
    ``skip_missing`` (validation) a batch holding images its teacher's cache lacks gets no targets
    from that teacher instead of a live pass.
    """

    def __init__(self, sources: Mapping[str, TeacherSource], offline_ratio: float, seed: int,
                 augment: Optional[GeometricAugment] = None, offline_max_shift: float = 0.05,
                 offline_crops: bool = False, skip_missing: bool = False, rank: int = 0) -> None:
        offline_ratio = check_offline_ratio(offline_ratio)
        self.sources = dict(sources)
        self.offline_ratio, self.seed = float(offline_ratio), int(seed)
        self.max_shift = float(offline_max_shift)
        # Validation reads a partial cache as it is: batches with uncached images are skipped for
        # that teacher (counted) instead of paying for live passes.
        self.skip_missing = bool(skip_missing)
        self.rank = int(rank)
        self.gates = {n: ViewGates.of(augment, bool(s.cache and s.cache.has_flip), offline_crops) for n,
                      s in self.sources.items()}
        self._index = {name: i for i, name in enumerate(sorted(self.sources))}
        self.counts: Dict[str, Counter] = {name: Counter() for name in self.sources}

    def live_reason(self, name: str) -> str:
        """Why a live pass can occur for ``name`` in this run ('' = never: no model is needed)."""
        src = self.sources[name]
        if not src.offline:
            return "offline: false"
        if src.cache is None:
            return f"no cache ({src.why_no_cache})"
        if self.offline_ratio < 1.0:
            return f"offline_ratio={self.offline_ratio}"
        if src.missing and not self.skip_missing:
            return "images missing from the cache (distillation.missing_cache=online)"
        return self.gates[name].why_live()

    def load_live_models(self, names: Optional[List[str]] = None) -> None:
        """Load the live model of every teacher (of ``names``) that can need one, and only those."""
        for name in names if names is not None else list(self.sources):
            src, why = self.sources[name], self.live_reason(name)
            if why and src.live is None:
                src.live = src.load_live()
                get_logger().info("teacher %s: live model loaded (%s)", name, why)
            elif not why:
                get_logger().info("teacher %s: cached features only; the model is not loaded", name)

    def _view_reason(self, name: str, batch: Batch, cached: TeacherTargets) -> str:
        gates, src = self.gates[name], self.sources[name]
        views = batch.views
        for i in range(len(views)):
            if gates.rotation and bool(views.rotated[i]):
                return "rotated view (no axis-aligned map to the cached grid)"
            if gates.flip and bool(views.flipped[i]):
                return "flipped view and the cache has no flipped pass (--with-flip)"
            if gates.crop and bool(views.cropped[i]):
                return "view crops the image (the cached map saw context this view lacks; offline_crops=false)"
            if gates.shift:
                shift = live_view_shift(views.view(i), cached.affine[i], cached.input_size, src.input_affine)
                if shift > self.max_shift:
                    return (f"view moved {shift:.0%} of the teacher canvas vs the cached pass "
                            f"(offline_max_shift {self.max_shift})")
        return ""

    def decide(self, step: int, name: str, batch: Batch, cached: Optional[TeacherTargets]) -> Route:
        """The route of ``name`` for the batch of ``step``: a pure function of its arguments (nothing is
        counted), so a prefetcher may decide a batch ahead of the step that trains on it."""
        src = self.sources[name]
        if self.skip_missing and src.cache is not None and cached is None:
            return Route("skipped", "images missing from the cache")
        if not src.offline:
            return Route("online", "teacher is online-only")
        if src.cache is None:
            return Route("online", "no cache for this split")
        if cached is None:
            return Route("online", "images missing from the cache")
        if offline_draw(self.seed, step, self._index[name], self.rank) >= self.offline_ratio:
            return Route("online", "offline_ratio draw")
        reason = self._view_reason(name, batch, cached)
        return Route("online", reason) if reason else Route("offline")

    def count(self, name: str, decision: Route) -> None:
        """Count one route of ``name`` (what :meth:`summary` reports)."""
        if decision.mode == "skipped":
            self.counts[name][f"skipped: {decision.reason}"] += 1
            return
        self.counts[name][decision.mode] += 1
        if decision.reason:
            self.counts[name][f"online: {decision.reason}"] += 1

    def route(self, step: int, name: str, batch: Batch, cached: Optional[TeacherTargets]) -> Route:
        decision = self.decide(step, name, batch, cached)
        self.count(name, decision)
        return decision

    def plan(self, step: int, batch: Batch, cached: Mapping[str, TeacherTargets],
             teachers: Optional[List[str]] = None) -> List[Tuple[str, Route]]:
        """(teacher, route) of each teacher in ``teachers`` (default: all) for this batch; nothing counted."""
        return [(name, self.decide(step, name, batch, cached.get(name)))
                for name in (teachers if teachers is not None else list(self.sources))]

    def live_model(self, name: str, route: Route) -> OnlineTeacher:
        """The loaded live model of a teacher routed online (every online route follows from a non-empty
        :meth:`live_reason`, so the model was loaded)."""
        live = self.sources[name].live
        assert live is not None, f"teacher {name} routed live ({route.reason}) without a live model"
        return live

    def targets(self, step: int, batch: Batch, cached: Mapping[str, TeacherTargets],
                teachers: Optional[List[str]] = None) -> Dict[str, TeacherTargets]:
        """Per teacher (default: all): the cached targets of this batch or a live pass on it."""
        out: Dict[str, TeacherTargets] = {}
        for name, route in self.plan(step, batch, cached, teachers):
            self.count(name, route)
            if route.mode == "offline":
                out[name] = cached[name]
            elif route.mode == "online":
                out[name] = self.live_model(name, route).targets(batch)
        return out

    def reset_counts(self) -> None:
        self.counts = {name: Counter() for name in self.sources}

    def summary(self) -> Dict[str, Dict[str, int]]:
        return {name: dict(c) for name, c in self.counts.items()}
