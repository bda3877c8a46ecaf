"""PNG summaries of a run: loss components, teacher-student cosine and val mAP per epoch; figures are
written atomically (:func:`save_figure`, through :mod:`vfmkd.utils.atomic_files`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Union

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, never open windows
import matplotlib.pyplot as plt  # noqa: E402

from vfmkd.utils.atomic_files import atomic_output  # noqa: E402


def save_figure(fig: Any, path: Union[str, Path], dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


#: The validation numbers drawn per head (whichever a head reports).
VAL_CURVES = ("mAP50", "mAP50-95", "mask_mAP50-95", "mIoU", "dice")


def plot_training_curves(history: List[Dict[str, Any]], path: Path) -> Path:
    """Three panels over epochs: train losses, ``cos_<teacher>``, each head's val metrics."""
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    keys = sorted({k for r in history for k in r["train"]})
    for k in keys:
        if k.startswith("loss") and not k.startswith("loss_det_"):
            axes[0].plot(epochs, [r["train"].get(k) for r in history], marker="o", label=k)
        if k.startswith("cos_"):
            axes[1].plot(epochs, [r["train"].get(k) for r in history], marker="o", label=k)
    evaluated = [r for r in history if "val" in r]
    for k in VAL_CURVES:  # per head (val[<head>][metric]); heads without the metric are skipped
        for head in sorted({h for r in evaluated for h, v in r["val"].items() if isinstance(v, dict) and k in v}):
            axes[2].plot([r["epoch"] for r in evaluated], [r["val"][head].get(k) for r in evaluated], marker="o",
                         label=f"{head} {k}")
    for ax, title in zip(axes, ("train losses (epoch mean)", "student-teacher cosine (valid pixels)",
                                "val metrics per head")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
