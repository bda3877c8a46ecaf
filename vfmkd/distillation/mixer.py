"""Per-batch choice between cached teacher features and a live teacher pass."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np

from vfmkd.core.errors import ConfigError


@dataclass
class Decision:
    """``mode`` is ``offline`` or ``online``; ``reason`` says why an online pass was chosen."""

    mode: str
    reason: str = ""


@dataclass
class TeacherMixer:
    """Chooses, per batch and teacher, cached features (probability ``offline_ratio``) or a live
    pass, reproducibly from ``seed`` and the step. A batch whose views cannot be matched to the
    cached grids (rotation, a flip without a flipped cache pass, images missing from the cache)
    goes to the live teacher whatever the draw. ``offline`` maps teacher -> its ``offline`` flag.
    """

    offline_ratio: float
    seed: int
    offline: Mapping[str, bool]
    counts: Dict[str, Counter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.offline_ratio) <= 1.0:
            raise ConfigError(f"distillation.offline_ratio must be within [0, 1], got {self.offline_ratio}")
        self._index = {name: i for i, name in enumerate(sorted(self.offline))}
        self.counts = {name: Counter() for name in self.offline}

    def decide(self, step: int, name: str, cached: Optional[Mapping[str, Any]], why_not_offline: str = "") -> Decision:
        if not self.offline[name]:
            decision = Decision("online", "teacher is online-only")
        elif cached is None:
            decision = Decision("online", "no cache for this split")
        else:
            draw = np.random.default_rng((self.seed, step, self._index[name])).random()
            if draw >= self.offline_ratio:
                decision = Decision("online", "offline_ratio draw")
            elif why_not_offline:
                decision = Decision("online", why_not_offline)
            else:
                decision = Decision("offline")
        self.counts[name][decision.mode] += 1
        if decision.reason:
            self.counts[name][f"online: {decision.reason}"] += 1
        return decision

    def summary(self) -> Dict[str, Dict[str, int]]:
        return {name: dict(c) for name, c in self.counts.items()}


def why_not_offline(cached: Mapping[str, Any], batch: Mapping[str, Any]) -> str:
    """'' when every view of the batch can be carried onto the cached grids, else the first reason
    the dataset gave (rotation, flip without a flipped pass, view moved beyond offline_max_shift, missing image)."""
    return next((reason for reason in cached["offline_block"] if reason), "")
