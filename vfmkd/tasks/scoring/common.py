"""What every scorer shares: the IoU thresholds of COCO AP, torchmetrics' local-only keyword, and the
frame conversions from the student canvas back to the original image (boxes and maps)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vfmkd.datasets.records import Batch

#: torchmetrics' keyword for a metric that scores only what this process saw: validation runs on rank 0
#: alone (the trainer), and a metric that synced in compute() would all_gather across the torchrun group
#: while the other ranks wait at the epoch barrier.
LOCAL_METRIC = {"sync_on_compute": False}

#: COCO's IoU thresholds 0.50:0.05:0.95 (ultralytics' greedy matching reads them as ``iouv``)
IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)


def to_original_boxes(boxes_xyxy: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Canvas pixels -> original image pixels (undo the letterbox: ``(x - ox) / sx``)."""
    sx, sy, ox, oy = affine.tolist()
    out = boxes_xyxy.clone()
    out[:, [0, 2]] = (out[:, [0, 2]] - ox) / sx
    out[:, [1, 3]] = (out[:, [1, 3]] - oy) / sy
    return out


def unletterbox(maps: torch.Tensor, batch: Batch, i: int) -> torch.Tensor:
    """(..., S, S) canvas map of batch item ``i`` -> (..., H, W) at its original size: the content
    box is cropped out and resized with nearest neighbour (labels stay labels); a mirrored view is
    mirrored back. Evaluation views are letterboxes; a rotated view has no such inverse."""
    view = batch.views.view(i)
    if view.rotated:
        raise ValueError(f"image {batch.image_ids[i]}: a rotated view cannot be scored at original resolution")
    x1, y1, x2, y2 = view.content_box
    crop = maps[..., y1:y2, x1:x2]
    if view.flipped:
        crop = crop.flip(-1)
    h, w = view.orig_hw
    lead = crop.shape[:-2]
    flat = crop.reshape(1, -1, *crop.shape[-2:]).float()
    return F.interpolate(flat, size=(h, w), mode="nearest").reshape(*lead, h, w).to(maps.dtype)


def upsampled(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, K, h, w) logits bilinearly resized to the canvas ``size`` (the losses' convention)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits.float()
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
