"""Binary segmentation head: the semantic head's fusion with one foreground logit."""
from __future__ import annotations

from typing import Sequence

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS
from vfmkd.models.heads.semantic_head import SemanticHead


@HEADS.register("binary_head")
class BinaryHead(SemanticHead):
    """Foreground logits (B, 1, S/output_stride, S/output_stride): :class:`SemanticHead` with one
    output channel (sigmoid > 0.5, i.e. logit > 0, is foreground)."""

    task = "binary"

    def __init__(self, in_specs: Sequence[FeatureSpec], channels: int = 64, output_stride: int = 8) -> None:
        super().__init__(in_specs, num_classes=1, channels=channels, output_stride=output_stride)
