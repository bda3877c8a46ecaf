"""Per-epoch logging of learned fusion weights: the neck's (``fusion_fpn``) and every head's that
merges levels with :class:`vfmkd.models.fusion.WeightedFusion` (``semantic_head``), into metrics.json
and TensorBoard."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def log_fusion_weights(model: torch.nn.Module, record: Dict[str, Any], writer: Optional[Any]) -> None:
    """A neck with ``fusion_weights()`` puts node -> normalised weights into ``record["fusion_weights"]``,
    heads with one put head -> node -> weights into ``record["head_fusion_weights"]``; with a writer each
    weight goes to ``fusion/<node>/<input>`` (neck) or ``fusion/<head>.<node>/<input>`` at ``record["epoch"]``."""
    model = getattr(model, "module", model)
    neck = getattr(model, "neck", None)
    if hasattr(neck, "fusion_weights"):
        record["fusion_weights"] = neck.fusion_weights()
        _write(neck, record["fusion_weights"], "", writer, record["epoch"])
    heads = {name: head for name, head in getattr(model, "heads", {}).items() if hasattr(head, "fusion_weights")}
    if heads:
        record["head_fusion_weights"] = {name: head.fusion_weights() for name, head in heads.items()}
        for name, head in heads.items():
            _write(head, record["head_fusion_weights"][name], f"{name}.", writer, record["epoch"])


def _write(module: Any, weights: Dict[str, Any], prefix: str, writer: Optional[Any], epoch: int) -> None:
    if writer is None:
        return
    inputs = module.fusion_inputs() if hasattr(module, "fusion_inputs") else {}
    for node, ws in weights.items():
        names = inputs.get(node) or [str(i) for i in range(len(ws))]
        for name, w in zip(names, ws):
            writer.add_scalar(f"fusion/{prefix}{node}/{name}", w, epoch)
