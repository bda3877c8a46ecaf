"""A query-based panoptic head in the style of RapSAM / K-Net: learnable queries whose kernels are refined
against the fused stride-8 pixel features by light dynamic-kernel stages.

RapSAM (Xu et al. 2024, "RAP-SAM: Towards Real-Time All-Purpose Segment Anything") keeps K-Net's
dynamic kernels (Zhang et al. 2021): a query is a kernel, its mask is ``kernel . pixel features``, and
each stage updates the kernel from the features its current mask pools (an adaptive, gated update),
then lets the queries talk (self-attention) and refines them (FFN). Every query predicts a class over
the panoptic classes plus "no object", a mask and an IoU score (how good it thinks its mask is).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS
from vfmkd.models.heads.base import BaseHead
from vfmkd.models.heads.semantic_head import FPNFusion

#: the stride of the pixel features the queries are refined against (and of the mask logits)
MASK_STRIDE = 8


class QuerySelfAttention(nn.Module):
    """Multi-head self-attention among the queries (B, Q, D) -> (B, Q, D), written with plain ops: torch's
    ``nn.MultiheadAttention`` takes a fused eval path that ONNX cannot export."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * (d // self.num_heads) ** -0.5).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, d))


class KernelUpdateStage(nn.Module):
    """One light decoder stage on kernels (B, Q, D) and their masks (B, Q, H, W) over pixel features
    (B, D, H, W): mask-pooled features -> K-Net's gated kernel update -> query self-attention -> FFN.
    Returns the new kernels (B, Q, D)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.feat_in, self.kernel_in = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gates = nn.Linear(dim, 2 * dim)
        self.feat_out, self.kernel_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_update, self.norm_attn, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = QuerySelfAttention(dim, num_heads)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))

    def forward(self, kernels: torch.Tensor, masks: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        weights = masks.sigmoid()
        # the features each query's soft mask covers (mean; +1 keeps an empty mask finite)
        pooled = torch.einsum("bqhw,bchw->bqc", weights, pixels) / (weights.sum((2, 3))[..., None] + 1.0)
        gate_feat, gate_kernel = self.gates(self.feat_in(pooled) * self.kernel_in(kernels)).sigmoid().chunk(2, -1)
        kernels = self.norm_update(gate_feat * self.feat_out(pooled) + gate_kernel * self.kernel_out(kernels))
        kernels = self.norm_attn(kernels + self.attn(kernels))
        return self.norm_ffn(kernels + self.ffn(kernels))


@HEADS.register("rapsam_head")
class RapSAMHead(BaseHead):
    """``num_queries`` learnable queries refined by ``num_stages`` :class:`KernelUpdateStage` s against
    the neck levels merged to stride 8 (:class:`FPNFusion`, the semantic head's multi-scale merge, with
    the neck's ``fusion``: ``learnable`` fast normalised fusion by default, its weights logged per epoch).

    ``forward(feats)`` (train and eval alike) returns ``(class_logits, mask_logits, iou)``:
    ``class_logits`` (B, Q, num_classes + 1), the last channel "no object"; ``mask_logits``
    (B, Q, S/8, S/8); ``iou`` (B, Q) in [0, 1], the predicted IoU of each query's mask with its object.
    ``num_classes`` counts the dataset's semantic class table, index 0 (unlabeled) included, so a
    class channel is the semantic index (as the semantic head's); index 0 is never a target.
    Queries are an unordered set (``set_prediction``). ``score_threshold`` ... ``use_iou``: the panoptic
    inference settings (:func:`vfmkd.tasks.scoring.query_panoptic.query_panoptic`), kept as
    ``panoptic_settings``."""

    task = "panoptic_query"
    set_prediction = True

    def __init__(self, in_specs: Sequence[FeatureSpec], num_classes: int, num_queries: int = 100,
                 channels: int = 64, num_stages: int = 2, num_heads: int = 4, ffn_dim: int = 256,
                 score_threshold: float = 0.5, overlap_threshold: float = 0.8, mask_threshold: float = 0.5,
                 min_area: int = 0, use_iou: bool = True, fusion: str = "learnable") -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (index 0 is unlabeled), got {num_classes}")
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1 (the number of segments the head can predict), got "
                             f"{num_queries}")
        if num_stages < 1 or channels % num_heads:
            raise ValueError(f"num_stages must be >= 1 and channels ({channels}) divisible by num_heads "
                             f"({num_heads}), got num_stages={num_stages}")
        thresholds = {"score_threshold": score_threshold, "overlap_threshold": overlap_threshold,
                      "mask_threshold": mask_threshold}
        bad = {k: v for k, v in thresholds.items() if not 0.0 <= v <= 1.0}
        if bad or min_area < 0:
            raise ValueError(f"panoptic inference thresholds must lie in [0, 1] and min_area >= 0, got "
                             f"{bad or min_area}")
        self.num_classes, self.num_queries = num_classes, num_queries
        #: the panoptic inference settings its task's scorer and pictures read (tasks.scoring.query_panoptic)
        self.panoptic_settings = {**thresholds, "min_area": int(min_area), "use_iou": bool(use_iou)}
        self.pixels = FPNFusion(in_specs, channels, MASK_STRIDE, fusion)
        self.level_names = self.pixels.level_names
        self.queries = nn.Embedding(num_queries, channels)
        self.stages = nn.ModuleList(KernelUpdateStage(channels, num_heads, ffn_dim) for _ in range(num_stages))
        self.mask_embed = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True),
                                        nn.Linear(channels, channels))
        self.classifier = nn.Linear(channels, num_classes + 1)
        self.iou_head = nn.Linear(channels, 1)

    def fusion_inputs(self) -> Dict[str, List[str]]:
        return self.pixels.fusion_inputs()

    def fusion_weights(self) -> Dict[str, List[float]]:
        return self.pixels.fusion_weights()

    def forward(self, feats: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = self.pixels(feats)  # (B, D, H, W)
        kernels = self.queries.weight[None].expand(pixels.shape[0], -1, -1)
        masks = torch.einsum("bqc,bchw->bqhw", kernels, pixels)
        for stage in self.stages:
            kernels = stage(kernels, masks, pixels)
            masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(kernels), pixels)
        return self.classifier(kernels), masks, self.iou_head(kernels)[..., 0].sigmoid()
