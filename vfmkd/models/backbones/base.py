"""The contract every student backbone fulfils."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, Dict, Tuple

import torch
from torch import nn

from vfmkd.core.feature_spec import FeatureSpec


class BaseBackbone(nn.Module, ABC):
    """A student trunk: ``forward(x: (B, 3, H, W))`` returns an ordered mapping level name ->
    ``(B, C_level, H / stride_level, W / stride_level)``, in the order of :meth:`feature_specs`.

    Subclasses return their taps from ``forward`` explicitly (no forward hooks) and describe them
    in one of two equivalent ways: :meth:`feature_specs` (one :class:`FeatureSpec` per level), or
    :meth:`get_feature_dims` and :meth:`get_feature_strides` (the design's contract: two ordered
    mappings level -> channels / stride). Whichever a class implements, the other is derived from it;
    a class with a concrete ``forward`` that implements neither is a TypeError at its definition.
    ``tests/test_backbones.py`` checks every registered backbone's outputs against the declaration.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls.forward, "__isabstractmethod__", False):
            return  # an intermediate base: the concrete class below it declares its levels
        has_specs = cls.feature_specs is not BaseBackbone.feature_specs
        getters = [m for m in _GETTERS if getattr(cls, m) is not getattr(BaseBackbone, m)]
        if not has_specs and len(getters) < len(_GETTERS):
            missing = " and ".join(m for m in _GETTERS if m not in getters)
            raise TypeError(f"backbone {cls.__name__} must declare its levels: implement feature_specs() "
                            f"(one FeatureSpec per level) or both get_feature_dims() and get_feature_strides() "
                            f"(it lacks {missing}).")

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        """One record per returned level, shallowest first; derived from :meth:`get_feature_dims`
        and :meth:`get_feature_strides` unless the subclass implements it."""
        dims, strides = self.get_feature_dims(), self.get_feature_strides()
        if list(dims) != list(strides):
            raise ValueError(f"{type(self).__name__}: get_feature_dims() names levels {list(dims)} but "
                             f"get_feature_strides() names {list(strides)}; they must name the same levels in order.")
        return tuple(FeatureSpec(name, int(dims[name]), int(strides[name])) for name in dims)

    @abstractmethod
    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Return the levels of :meth:`feature_specs` for a batch of images."""

    def get_feature_dims(self) -> Dict[str, int]:
        """Level name -> channels, shallowest first; derived from :meth:`feature_specs` unless implemented."""
        return {spec.name: spec.channels for spec in self.feature_specs()}

    def get_feature_strides(self) -> Dict[str, int]:
        """Level name -> stride in input pixels, shallowest first; derived from :meth:`feature_specs`
        unless implemented."""
        return {spec.name: spec.stride for spec in self.feature_specs()}

    def feature_spec(self, name: str) -> FeatureSpec:
        for spec in self.feature_specs():
            if spec.name == name:
                return spec
        raise KeyError(f"{type(self).__name__} has no level '{name}'; it returns {list(self.get_feature_dims())}")


#: the design's alternative to :meth:`BaseBackbone.feature_specs`
_GETTERS = ("get_feature_dims", "get_feature_strides")
