"""The contract every frozen teacher fulfils."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from vfmkd.core.feature_spec import FeatureSpec


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

    def differences(self, other: "TeacherFingerprint", ignore: Sequence[str] = ()) -> List[str]:
        """Human-readable 'field: mine != theirs' lines for every differing field."""
        mine, theirs = self.as_dict(), other.as_dict()
        return [f"{k}: {theirs[k]!r} != {mine[k]!r}" for k in mine if k not in ignore and mine[k] != theirs[k]]


@dataclass
class TeacherBatch:
    """A preprocessed batch. ``pixels``: (B, 3, S, S) normalised teacher input.
    ``affine``: (B, 4) as (sx, sy, ox, oy): original image pixel (x, y) lands at teacher input pixel
    (x * sx + ox, y * sy + oy). ``valid_hw``: (B, 2) height/width of the unpadded image region in
    teacher input pixels. Together they let the distiller map teacher cells onto student cells.
    """

    pixels: torch.Tensor
    affine: torch.Tensor
    valid_hw: torch.Tensor


class BaseTeacher(nn.Module, ABC):
    """A frozen foundation model that owns its preprocessing.

    ``extract_features(images)`` takes original RGB uint8 images ``(H_i, W_i, 3)`` of any sizes and
    returns ``(features, batch)`` where ``features[name]`` is ``(B, C, S / stride, S / stride)`` as
    declared by :meth:`feature_specs` and ``batch`` is the :class:`TeacherBatch` geometry.
    The module is always in eval mode, has no trainable parameters and runs without autograd.
    """

    family: str = "teacher"
    #: the map a loss distils when it names no ``teacher_feature``
    primary_feature: str = ""

    def __init__(self) -> None:
        super().__init__()

    def freeze(self) -> None:
        """Call at the end of a subclass constructor."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "BaseTeacher":  # a teacher never leaves eval mode
        return super().train(False)

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Side of the square canvas the teacher sees, in pixels."""

    @abstractmethod
    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        """The maps :meth:`forward_features` returns; strides relative to :attr:`input_size`."""

    @abstractmethod
    def preprocess(self, images: Sequence[np.ndarray]) -> TeacherBatch:
        """Resize, pad and normalise original RGB uint8 images into one batch."""

    @classmethod
    def input_affine(cls, height: int, width: int, input_size: int) -> Tuple[float, float, float, float]:
        """(sx, sy, ox, oy) that :meth:`preprocess` applies to a ``height`` x ``width`` image. The
        default is the common recipe (long side to ``input_size``, padding bottom-right); override
        it when ``preprocess`` differs (SAM2 stretches to a square). Offline runs use it to predict
        how a live pass would see an augmented view without loading the model."""
        scale = input_size / max(height, width)
        return (round(width * scale) / width, round(height * scale) / height, 0.0, 0.0)

    @abstractmethod
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Run the frozen model on a preprocessed batch."""

    @abstractmethod
    def fingerprint(self) -> TeacherFingerprint:
        """Identity of the features this teacher produces."""

    @classmethod
    @abstractmethod
    def config_fingerprint(cls, **kwargs) -> TeacherFingerprint:
        """The fingerprint a teacher built with these constructor kwargs would have, without
        building it (offline runs check their caches this way). ``weights`` starts with
        ``unknown`` when the checkpoint is not on this machine."""

    @property
    def device(self) -> torch.device:
        for t in self.buffers():
            return t.device
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def extract_features(self, images: Sequence[np.ndarray]) -> Tuple[Dict[str, torch.Tensor], TeacherBatch]:
        batch = self.preprocess(images)
        batch.pixels = batch.pixels.to(self.device)
        return self.forward_features(batch.pixels), batch
