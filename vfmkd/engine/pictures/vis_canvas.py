"""The drawing ground every vfmkd picture shares: the fixed class colours, the pixel-exact panel
layout (:class:`PanelCanvas`: a title, column names, row names and a grid of pictures, written
atomically as one PNG with matplotlib Agg), resizing maps to a picture, and where a run's pictures
go (:func:`visualization_path`).

The trainer writes pictures every ``train.vis_interval`` epochs (``visualizations/epoch_XXX.png``)
and ``tools/test.py`` per sample batch (``visualizations/test_sample_XXX.png``). The panels drawn on
this ground: :mod:`vfmkd.engine.pictures.prediction_panel` (teacher vs student predictions per head),
:mod:`vfmkd.engine.pictures.feature_pca` (feature maps), :mod:`vfmkd.engine.pictures.panoptic_vis` (panoptic segments).
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from vfmkd.utils.plots import save_figure  # noqa: E402

CELL_PX = 160  # one picture
LABEL_PX = 120  # left margin: image id and head name of each row
HEADER_PX = 44  # top margin: title and column names (two lines)
DPI = 100


def colour_table(n: int = 256) -> np.ndarray:
    """(n, 3) uint8, the fixed class colours: index 0 (unlabelled / background) black, then hues
    spaced by the golden ratio with alternating saturation/value, the same in every run."""
    table = np.zeros((n, 3), np.uint8)
    for k in range(1, n):
        hue = (k * 0.618033988749895) % 1.0
        sat, val = (0.85, 1.0) if k % 2 else (0.6, 0.85)
        table[k] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return table


COLOURS = colour_table(256)


def class_colour(k: int) -> np.ndarray:
    """(3,) float in [0, 1] for class ``k`` (a detection class id k gets colour k + 1, never black)."""
    return COLOURS[1 + int(k) % (len(COLOURS) - 1)] / 255.0


def visualization_path(run_dir: Union[str, Path], kind: str, index: int, suffix: str = "") -> Path:
    """``run_dir/visualizations/{kind}_{index:03d}{suffix}.png``; kind ``epoch`` (training) or
    ``test_sample`` (tools/test.py); suffix e.g. ``_pca`` for the feature panel."""
    return Path(run_dir) / "visualizations" / f"{kind}_{int(index):03d}{suffix}.png"


# ----------------------------------------------------------------------------------------- layout
def panel_size(n_rows: int, n_cols: int) -> Tuple[int, int]:
    """(width, height) in pixels of a panel with this many picture rows and columns."""
    return LABEL_PX + n_cols * CELL_PX, HEADER_PX + n_rows * CELL_PX


def cell_box(row: int, col: int) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixels of picture (row, col) in a panel PNG."""
    x0, y0 = LABEL_PX + col * CELL_PX, HEADER_PX + row * CELL_PX
    return x0, y0, x0 + CELL_PX, y0 + CELL_PX


def _fit(text: str, n: int) -> str:
    """Each line of ``text`` cut to its last ``n`` characters (level names end in what matters)."""
    return "\n".join(line if len(line) <= n else "..." + line[-(n - 3):] for line in text.split("\n"))


class PanelCanvas:
    """A figure whose pictures sit on an exact pixel grid (no tight layout: sizes are predictable)."""

    def __init__(self, n_rows: int, n_cols: int, title: str, col_names: Sequence[str], row_names: Sequence[str]):
        self.w, self.h = panel_size(n_rows, n_cols)
        self.fig = plt.figure(figsize=(self.w / DPI, self.h / DPI), dpi=DPI)
        self.fig.patch.set_facecolor("white")
        if title:
            self.fig.text(4 / self.w, 1 - 3 / self.h, title, ha="left", va="top", fontsize=9, weight="bold")
        for c, name in enumerate(col_names):
            x0, y0, x1, _ = cell_box(0, c)
            self.fig.text((x0 + x1) / 2 / self.w, 1 - (y0 - 3) / self.h, _fit(name, 32), ha="center", va="bottom",
                          fontsize=7)
        for r, name in enumerate(row_names):
            _, y0, _, y1 = cell_box(r, 0)
            self.fig.text(4 / self.w, 1 - (y0 + y1) / 2 / self.h, name, ha="left", va="center", fontsize=7, wrap=True)

    def axes(self, row: int, col: int) -> Any:
        x0, y0, x1, y1 = cell_box(row, col)
        ax = self.fig.add_axes((x0 / self.w, 1 - y1 / self.h, (x1 - x0) / self.w, (y1 - y0) / self.h))
        ax.set_axis_off()
        return ax

    def picture(self, row: int, col: int, rgb: np.ndarray, boxes: Sequence[Tuple[np.ndarray, np.ndarray, str]] = (),
                note: str = "") -> None:
        ax = self.axes(row, col)
        h, w = rgb.shape[:2]
        ax.imshow(np.clip(rgb, 0, 1), extent=(0, w, h, 0), interpolation="nearest")
        for xyxy, colour, label in boxes:
            x1, y1, x2, y2 = (float(v) for v in xyxy)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.2))
            if label:
                ax.text(x1, y1, label, fontsize=5, color="black", va="bottom", ha="left", clip_on=True,
                        bbox=dict(facecolor=colour, edgecolor="none", pad=0.5, alpha=0.8))
        if note:
            ax.text(2, 2, note, fontsize=6, color="white", va="top", ha="left",
                    bbox=dict(facecolor="black", edgecolor="none", pad=0.5, alpha=0.6))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)

    def message(self, row: int, col: int, text: str) -> None:
        ax = self.axes(row, col)
        ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor="0.9", edgecolor="0.7"))
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="0.3", transform=ax.transAxes, wrap=True)

    def save(self, path: Union[str, Path]) -> Path:
        return save_figure(self.fig, path, dpi=DPI)


def resize_map(x: torch.Tensor, hw: Tuple[int, int], nearest: bool) -> torch.Tensor:
    """(…, h, w) -> (…, H, W); labels/bools nearest, probabilities bilinear."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:]).float()
    if flat.shape[0] == 0:
        return x.new_zeros((*lead, *hw))
    out = F.interpolate(flat, size=hw, mode="nearest") if nearest else F.interpolate(
        flat, size=hw, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *hw).to(x.dtype if nearest else torch.float32)
