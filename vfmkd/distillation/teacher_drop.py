"""Teacher dropping (``distillation.teacher_drop_prob``, the AM-RADIO / UNIC recipe): each step every
distilled teacher is left out with probability p, never all of them; the kept teachers' loss terms are
scaled by n / n_kept so the distillation signal keeps its expected size. A dropped live teacher's
forward pass is not run (the step-time saving); a dropped cached one is simply not read by the loss.

The draw is a pure function of (seed, step): the same on every rank (DDP ranks drop together, so the
same parameters go unused) and the same after a resume (the step counter is restored).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Sequence, Union

import numpy as np

from vfmkd.core.errors import ConfigError

#: separates this stream from the other (seed, step) draws (offline_ratio's, multi-resolution's)
STREAM = 0x7D0


@dataclass(frozen=True)
class TeacherDraw:
    """One step's outcome: ``kept`` teachers (sorted), ``scale``: teacher -> weight factor n / n_kept, ``dropped``."""

    kept: List[str]
    scale: Dict[str, float]
    dropped: List[str] = field(default_factory=list)


def check_drop_prob(prob: float) -> float:
    if not 0.0 <= float(prob) < 1.0:
        raise ConfigError(f"distillation.teacher_drop_prob must be within [0, 1) (each teacher is dropped with this "
                          f"probability per step), got {prob}")
    return float(prob)


class TeacherDropper:
    """Draws the teachers a step keeps (:meth:`draw`, a pure function: a prefetcher may draw a step ahead)
    and counts the drops of a range of steps (:meth:`counts`, per epoch)."""

    def __init__(self, prob: float, seed: int) -> None:
        self.prob, self.seed = check_drop_prob(prob), int(seed)

    def draw(self, step: int, teachers: Sequence[str]) -> TeacherDraw:
        names = sorted(teachers)
        if not names or self.prob == 0.0:
            return TeacherDraw(names, {n: 1.0 for n in names})
        rng = np.random.default_rng((self.seed, int(step), STREAM))
        keep = rng.random(len(names)) >= self.prob
        if not keep.any():  # never all: one teacher, drawn uniformly, stays
            keep[int(rng.integers(len(names)))] = True
        kept = [n for n, k in zip(names, keep) if k]
        return TeacherDraw(kept, {n: len(names) / len(kept) for n in kept}, [n for n in names if n not in kept])

    def plan(self, teachers: Sequence[str]) -> Union[List[str], Callable[[int], List[str]]]:
        """What the epoch's prefetcher asks the router for: ``teachers`` (no dropping) or step -> the
        teachers that step keeps."""
        if self.prob == 0.0:
            return list(teachers)
        return lambda step: self.draw(step, teachers).kept

    def counts(self, steps: Iterable[int], teachers: Sequence[str]) -> Dict[str, int]:
        """{'steps': distilling steps, '<teacher>': times dropped} over ``steps``: recomputed from the draws, so
        an epoch resumed midway reports what the uninterrupted epoch would."""
        out = {"steps": 0, **{n: 0 for n in sorted(teachers)}}
        for step in steps:
            out["steps"] += 1
            for name in self.draw(step, teachers).dropped:
                out[name] += 1
        return out
