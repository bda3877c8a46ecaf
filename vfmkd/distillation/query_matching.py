"""Hungarian matching of a query head's predictions to target masks, as Mask2Former matches them
(Cheng et al. 2022): masks compared at the same random points, cost = ``cls`` x (-p(target class))
+ ``mask`` x point-wise BCE + ``dice`` x Dice, solved by scipy's ``linear_sum_assignment``.

Used by the query head's task loss (targets: the batch's panoptic segments) and by its SAM output
pairing (targets: SAM's box-prompted masks as soft probabilities)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class MatchCosts:
    """Weights of the matching cost (Mask2Former's defaults)."""

    cls: float = 2.0
    mask: float = 5.0
    dice: float = 5.0


def random_points(num: int, device: torch.device) -> torch.Tensor:
    """(num, 2) uniform (x, y) in [0, 1): one draw shared by the predictions and the targets of an image."""
    return torch.rand(num, 2, device=device)


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps read bilinearly at (P, 2) normalised (x, y) points -> (N, P). Maps of any
    resolution that cover the same canvas meet at the same points."""
    grid = (points * 2 - 1).to(maps.dtype)[None, None].expand(maps.shape[0], -1, -1, -1)  # (N, 1, P, 2)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", align_corners=False)[:, 0, 0]


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean point-wise BCE of every prediction (Q, P) logits against every target (T, P) in [0, 1] -> (Q, T)."""
    pos, neg = F.softplus(-logits), F.softplus(logits)  # -log p, -log(1 - p)
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of every prediction (Q, P) logits against every target (T, P) -> (Q, T)."""
    probs = logits.sigmoid()
    inter = probs @ targets.T
    return 1 - (2 * inter + 1) / (probs.sum(1)[:, None] + targets.sum(1)[None] + 1)


@torch.no_grad()
def hungarian_match(class_logits: torch.Tensor, mask_points: torch.Tensor, target_classes: torch.Tensor,
                    target_points: torch.Tensor, costs: MatchCosts = MatchCosts()) -> Tuple[torch.Tensor, torch.Tensor]:
    """One image: queries' ``class_logits`` (Q, C + 1) and mask logits at the points ``mask_points``
    (Q, P) vs ``target_classes`` (T,) and target masks at the same points ``target_points`` (T, P) in
    [0, 1] -> (query index (M,), target index (M,)), M = min(Q, T), int64 on the logits' device."""
    device = class_logits.device
    if len(target_classes) == 0 or class_logits.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    logits, targets = mask_points.float(), target_points.float()
    cost = (-costs.cls * class_logits.float().softmax(-1)[:, target_classes.long()]
            + costs.mask * pairwise_bce(logits, targets) + costs.dice * pairwise_dice(logits, targets))
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    as_index = lambda a: torch.as_tensor(a, dtype=torch.long, device=device)  # noqa: E731
    return as_index(rows), as_index(cols)
