"""The contract every student backbone fulfils."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Dict, Tuple

import torch
from torch import nn

from vfmkd.core.feature_spec import FeatureSpec


class BaseBackbone(nn.Module, ABC):
    """A student trunk: ``forward(x: (B, 3, H, W))`` returns an ordered mapping level name ->
    ``(B, C_level, H / stride_level, W / stride_level)``, in the order of :meth:`feature_specs`.

    Subclasses return their taps from ``forward`` explicitly (no forward hooks) and describe them
    once in :meth:`feature_specs`; ``get_feature_dims``/``get_feature_strides`` derive from it, and
    ``tests/test_backbones.py`` checks every registered backbone's outputs against it.
    """

    @abstractmethod
    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        """One record per returned level, shallowest first."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Return the levels of :meth:`feature_specs` for a batch of images."""

    def get_feature_dims(self) -> Dict[str, int]:
        return {spec.name: spec.channels for spec in self.feature_specs()}

    def get_feature_strides(self) -> Dict[str, int]:
        return {spec.name: spec.stride for spec in self.feature_specs()}

    def feature_spec(self, name: str) -> FeatureSpec:
        for spec in self.feature_specs():
            if spec.name == name:
                return spec
        raise KeyError(f"{type(self).__name__} has no level '{name}'; it returns {list(self.get_feature_dims())}")
