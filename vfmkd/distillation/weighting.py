"""Task / output-KD / feature weighting of the loss terms into one training loss."""
from __future__ import annotations

from typing import Dict, Mapping

import torch

# Loss ``kind`` (the class attribute every registered loss carries) -> which group weight scales it.
GROUPS: Dict[str, str] = {"task": "alpha", "output": "beta", "feature": "gamma"}


def combine(
    terms: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
    weights: Mapping[str, float],
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """``alpha * sum(task w*L) + beta * sum(output w*L) + gamma * sum(feature w*L)``.

    ``terms``, ``kinds`` and ``weights`` are keyed by the same loss names; ``kinds[name]`` is the
    loss's ``kind`` ("task", "output" or "feature") and ``weights[name]`` its per-loss weight
    (1.0 when absent, like a config entry without ``weight:``). With ``alpha = beta = gamma = 1``
    this is exactly ``sum(w * L)``, the plain per-loss weighting; the group weights then let a run
    trade task against KD against feature terms without editing every loss entry.
    Returns a scalar tensor (zero when there are no terms).
    """
    group = {"alpha": float(alpha), "beta": float(beta), "gamma": float(gamma)}
    total = None
    for name, value in terms.items():
        if name not in kinds:
            raise KeyError(f"loss term '{name}' has no kind; known: {sorted(kinds)}")
        kind = kinds[name]
        if kind not in GROUPS:
            raise ValueError(f"loss term '{name}' has kind '{kind}'; expected one of {sorted(GROUPS)}")
        part = group[GROUPS[kind]] * float(weights.get(name, 1.0)) * value
        total = part if total is None else total + part
    return torch.zeros(()) if total is None else total
