"""PNG summaries of a run: loss components, teacher-student cosine and val mAP per epoch."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, never open windows
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: List[Dict[str, Any]], path: Path) -> Path:
    """Three panels over epochs: train losses, ``cos_<teacher>``, val mAP50 / mAP50-95."""
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    keys = sorted({k for r in history for k in r["train"]})
    for k in keys:
        if k.startswith("loss") and not k.startswith("loss_det_"):
            axes[0].plot(epochs, [r["train"].get(k) for r in history], marker="o", label=k)
        if k.startswith("cos_"):
            axes[1].plot(epochs, [r["train"].get(k) for r in history], marker="o", label=k)
    evaluated = [r for r in history if "val" in r]
    for k in ("mAP50", "mAP50-95"):
        axes[2].plot([r["epoch"] for r in evaluated], [r["val"][k] for r in evaluated], marker="o", label=k)
    for ax, title in zip(axes, ("train losses (epoch mean)", "student-teacher cosine (valid pixels)", "val mAP")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
