"""Feature-affinity (FA) distillation: match the pairwise similarity structure of two maps.

From DSRL (Wang et al., "Dual Super-Resolution Learning for Semantic Segmentation", CVPR 2020).
Instead of matching features vector by vector, it matches which locations look alike, which
transfers the teacher's spatial/semantic grouping and is indifferent to the teacher's channel basis.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.losses.feature import FeatureDistillLoss


def pool_factor(fa_subscale: float) -> int:
    """The pooling kernel (= stride) for ``fa_subscale``.

    One rule covers both spellings: a value below 1 is a *scale* (DSRL's ``subscale``; 0.125 keeps
    1/8 of each side), a value of 1 or more is the integer *factor* (8 means the same as 0.125).
    The two ranges only meet at 1, where both mean "no pooling".
    """
    v = float(fa_subscale)
    if v <= 0:
        raise ConfigError(f"feature_affinity: fa_subscale must be > 0 (e.g. 0.125 or 8), got {fa_subscale}")
    k = 1.0 / v if v < 1 else v
    if abs(k - round(k)) > 1e-6:
        raise ConfigError(
            f"feature_affinity: fa_subscale {fa_subscale} does not give an integer pooling factor "
            f"(got {k:.4g}); use a scale like 0.5, 0.25, 0.125 or an integer factor like 2, 4, 8"
        )
    return int(round(k))


def affinity(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, N, N), N = h*w: cosine similarity between every pair of locations."""
    # eps keeps all-zero vectors (zero padding) finite; DSRL divides by the raw norm and would NaN.
    f = F.normalize(features.flatten(2), dim=1, eps=1e-12)
    return f.transpose(1, 2) @ f


@LOSSES.register("feature_affinity")
class FeatureAffinityLoss(FeatureDistillLoss):
    """DSRL's FA loss on the adapted student map vs the teacher map.

    ``forward(student (B, C_s, H, W), teacher (B, C_t, H, W), mask (B, 1, H, W))`` -> ``(loss, cosine)``.

    With ``k = pool_factor(fa_subscale)``: ``P = avg_pool(., k, stride=k)`` (floor mode, as DSRL's
    ``AvgPool2d``; a partial border window is dropped), ``F_i`` the L2-normalised pooled vector at
    location i, ``S_ij = F_i . F_j`` (N x N, N = (H//k)(W//k)) and ``v_i = [avg_pool(mask)_i > 0.5]``::

        loss = sum_b,i,j v_i v_j |S_student - S_teacher|_bij / sum_b,i,j v_i v_j

    i.e. the mean absolute affinity difference over valid pairs. DSRL's own code divides the L1
    sum by N^2 only (so it grows with batch size); this is the per-entry mean, which for one image
    with all locations valid equals DSRL's value. ``cosine`` is the full-resolution masked cosine,
    as every feature loss reports. Memory is B*N^2 floats: pool enough for large maps
    (a 80x80 map at factor 1 is 41M entries per image).
    """

    def __init__(
        self,
        teacher: str,
        student_channels: int,
        teacher_channels: int,
        student_level: Optional[str] = None,
        teacher_feature: Optional[str] = None,
        adapter_hidden: Optional[int] = None,
        fa_subscale: float = 0.125,
    ) -> None:
        super().__init__(teacher, student_channels, teacher_channels, student_level, teacher_feature, adapter_hidden)
        self.fa_subscale = fa_subscale
        self.pool = pool_factor(fa_subscale)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.pool, self.pool) if self.pool > 1 else x

    def compare(self, adapted: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, w = adapted.shape[-2:]
        if h < self.pool or w < self.pool:
            raise ValueError(
                f"feature_affinity: a {h}x{w} map pooled by {self.pool} leaves no location; "
                f"use a larger fa_subscale (smaller factor) or a finer student level"
            )
        valid = (self._pool(mask) > 0.5).float().flatten(1)  # (B, N)
        pair = valid[:, :, None] * valid[:, None, :]  # (B, N, N): both ends valid
        diff = (affinity(self._pool(adapted)) - affinity(self._pool(teacher))).abs()
        return (diff * pair).sum() / pair.sum().clamp_min(1.0)
