"""Per-epoch logging of a neck's learned fusion weights (``fusion_fpn``): metrics.json and TensorBoard."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def log_fusion_weights(model: torch.nn.Module, record: Dict[str, Any], writer: Optional[Any]) -> None:
    """A neck with ``fusion_weights()`` puts node -> normalised weights into ``record["fusion_weights"]``
    and, with a writer, each weight as ``fusion/<node>/<input>`` at ``record["epoch"]``; others: nothing."""
    neck = getattr(getattr(model, "module", model), "neck", None)
    if not hasattr(neck, "fusion_weights"):
        return
    weights = neck.fusion_weights()
    record["fusion_weights"] = weights
    if writer is None:
        return
    inputs = neck.fusion_inputs() if hasattr(neck, "fusion_inputs") else {}
    for node, ws in weights.items():
        names = inputs.get(node) or [str(i) for i in range(len(ws))]
        for name, w in zip(names, ws):
            writer.add_scalar(f"fusion/{node}/{name}", w, record["epoch"])
