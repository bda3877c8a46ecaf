"""Panoptic pictures: per image, input | ground truth | prediction | prediction on the input, each
segment coloured by its category (things: the category's colour, a shade per instance so touching
instances differ) and labelled with its class name (the largest :data:`MAX_LABELS`). Void is black
(and transparent on the input). Drawn with :mod:`vfmkd.engine.pictures.vis_canvas`'s panel layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple, Union

import numpy as np

from vfmkd.engine.pictures.vis_canvas import PanelCanvas, class_colour

COLUMNS = ("input", "ground truth (panoptic)", "prediction (panoptic)", "prediction on input")
MAX_LABELS = 12  # class names written per picture, largest segments first
SHADES = (1.0, 0.7, 0.85, 0.55, 0.95, 0.65)  # brightness per instance of a thing category


def _segments(seg: Any) -> List[Tuple[int, int, bool]]:
    """(segment id, category id, isthing) of a ``PanopticTarget`` or a ``PanopticPrediction``."""
    items = seg.segments.values() if isinstance(seg.segments, Mapping) else seg.segments
    return [(int(s.id), int(s.category_id), bool(s.isthing)) for s in items]


def _ids(seg: Any) -> np.ndarray:
    ids = seg.ids
    return ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)


def colour_segments(ids: np.ndarray, segments: Sequence[Tuple[int, int, bool]]) -> Tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float colours and (H, W) bool labelled-pixel mask of a segment id map."""
    colour = np.zeros((*ids.shape, 3), np.float32)
    seen: dict = {}
    for sid, cat, isthing in segments:
        shade = 1.0
        if isthing:
            n = seen.get(cat, 0)
            seen[cat] = n + 1
            shade = SHADES[n % len(SHADES)]
        colour[ids == sid] = class_colour(cat) * shade
    known = np.isin(ids, [s for s, _, _ in segments])
    return colour, known


def _labels(ids: np.ndarray, segments: Sequence[Tuple[int, int, bool]],
            names: Mapping[int, str]) -> List[Tuple[float, float, str, np.ndarray]]:
    """(x, y, name, colour) of the largest segments, at the segment pixel nearest its centroid."""
    out = []
    sized = []
    for sid, cat, _ in segments:
        ys, xs = np.nonzero(ids == sid)
        if len(xs):
            sized.append((len(xs), sid, cat, xs, ys))
    for _, _, cat, xs, ys in sorted(sized, key=lambda t: -t[0])[:MAX_LABELS]:
        cx, cy = xs.mean(), ys.mean()
        k = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
        out.append((float(xs[k]), float(ys[k]), names.get(cat, str(cat)), class_colour(cat)))
    return out


def _picture(canvas: PanelCanvas, row: int, col: int, rgb: np.ndarray, labels, note: str) -> None:
    canvas.picture(row, col, rgb, note=note)
    ax = canvas.fig.axes[-1]
    for x, y, name, colour in labels:
        ax.text(x, y, name, fontsize=5, color="black", ha="center", va="center", clip_on=True,
                bbox=dict(facecolor=colour, edgecolor="none", pad=0.4, alpha=0.8))


def render_panoptic(path: Union[str, Path], items: Sequence[Tuple[str, np.ndarray, Any, Any]],
                    names: Mapping[int, str], title: str = "panoptic: ground truth | prediction") -> Path:
    """One PNG, a row per ``(image id, image (H, W, 3) float in [0, 1] at the original size, ground
    truth, prediction)``; ground truth and prediction are ``PanopticTarget`` / ``PanopticPrediction``
    (``ids`` (H, W) and segments with ``id``, ``category_id``, ``isthing``). ``names``: category id ->
    name. Written atomically; returns ``path``."""
    if not items:
        raise ValueError("render_panoptic needs at least one image")
    canvas = PanelCanvas(len(items), len(COLUMNS), title, COLUMNS, [str(it[0]) for it in items])
    for r, (_, image, target, pred) in enumerate(items):
        img = np.clip(np.asarray(image, np.float32), 0, 1)
        canvas.picture(r, 0, img)
        for col, seg in ((1, target), (2, pred)):
            ids, segs = _ids(seg), _segments(seg)
            colour, known = colour_segments(ids, segs)
            shown = np.where(known[..., None], colour, 0.0)
            things = sum(1 for _, _, t in segs if t)
            _picture(canvas, r, col, shown, _labels(ids, segs, names), f"things {things}, stuff {len(segs) - things}")
            if col == 2:
                a = known[..., None] * 0.55
                _picture(canvas, r, 3, img * (1 - a) + colour * a, [], "")
    return canvas.save(path)
