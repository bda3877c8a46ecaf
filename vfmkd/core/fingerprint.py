"""The identity of a teacher's features: what a cache records and a run compares (no model needed)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence


@dataclass(frozen=True)
class TeacherFingerprint:
    """Everything that changes a teacher's features; a cache is only reused when it matches.

    ``weights`` is the checkpoint's sha256, or ``random-init`` when the user asked for random
    weights. ``preprocessing`` names the resize/pad/normalisation recipe.
    """

    family: str
    variant: str
    weights: str
    input_size: int
    dtype: str
    preprocessing: str

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    def differences(self, other: TeacherFingerprint, ignore: Sequence[str] = ()) -> List[str]:
        """Human-readable 'field: mine != theirs' lines for every differing field."""
        mine, theirs = self.as_dict(), other.as_dict()
        return [f"{k}: {theirs[k]!r} != {mine[k]!r}" for k in mine if k not in ignore and mine[k] != theirs[k]]
