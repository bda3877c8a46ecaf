"""Loss formulas checked against direct computations."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vfmkd.distillation.losses import FeatureMSELoss


def test_feature_mse_and_cosine_over_valid_locations():
    torch.manual_seed(0)
    loss = FeatureMSELoss(teacher="sam", student_channels=4, teacher_channels=6)
    s, t = torch.randn(2, 4, 5, 7), torch.randn(2, 6, 5, 7)
    mask = torch.zeros(2, 1, 5, 7)
    mask[:, :, 1:4, 2:6] = 1
    value, cos = loss(s, t, mask)
    a = loss.adapter(s)
    sel = mask.expand(-1, 6, -1, -1).bool()
    expected = ((a - t) ** 2)[sel].mean()
    torch.testing.assert_close(value, expected)
    cos_map = F.cosine_similarity(a, t, dim=1)
    torch.testing.assert_close(cos, cos_map[mask[:, 0].bool()].mean())
    # Values under the mask do not matter.
    t2 = t.clone()
    t2[:, :, 0] = 1e6
    torch.testing.assert_close(loss(s, t2, mask)[0], value)
