"""Typed description of one feature level: what a backbone or teacher promises to return."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    """One feature map of a model.

    ``name`` is the key in the model's output mapping, ``channels`` the C of its ``(B, C, H, W)``
    tensor and ``stride`` the input pixels per feature cell, so ``H = input_h / stride``.
    """

    name: str
    channels: int
    stride: int

    def __post_init__(self) -> None:
        if self.channels <= 0 or self.stride <= 0:
            raise ValueError(f"FeatureSpec {self.name!r}: channels and stride must be positive, got {self}")
