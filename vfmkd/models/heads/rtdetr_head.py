"""DETR-style detection head: ultralytics' ``RTDETRDecoder`` (imported, not copied) on the neck's levels.

RT-DETR trains with contrastive denoising: noised copies of the ground-truth boxes are decoded next
to the object queries, so the decoder needs the batch's boxes in the same pass that the loss
scores. vfmkd's engine runs ``model(images)`` first and hands the head's output to the task loss
with the batch, so the training forward stops before the decoder: it returns the decoder inputs
(``{"feats": [P3, P4, P5]}``) and the ``rtdetr_detection`` loss finishes with
:meth:`RTDETRHead.decode` ``(output, batch.boxes)``. Both run inside the training step (and inside
DDP's forward), so every decoder weight trains exactly as in ultralytics' own RT-DETR.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Sequence

import torch
from ultralytics.nn.modules import RTDETRDecoder

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS
from vfmkd.models.heads.base import BaseHead


class GroundTruthBoxes(Protocol):
    """A batch's boxes as the head reads them (the datasets' ``DetectionBatch`` has this shape):
    ``cls`` (N, 1) float, ``bboxes`` (N, 4) normalised cxcywh, ``batch_idx`` (N,) float image of each box."""

    cls: torch.Tensor
    bboxes: torch.Tensor
    batch_idx: torch.Tensor


def decoder_targets(boxes: GroundTruthBoxes, batch_size: int) -> Dict[str, Any]:
    """A batch's boxes (:class:`GroundTruthBoxes`) in the layout ultralytics' RT-DETR decoder and loss read (what
    ``RTDETRDetectionModel.loss`` builds): ``cls``/``batch_idx`` (N,) int64, ``gt_groups`` boxes per image."""
    batch_idx = boxes.batch_idx.long().view(-1)
    gt_groups = torch.bincount(batch_idx, minlength=batch_size).tolist() if len(batch_idx) else [0] * batch_size
    return {"cls": boxes.cls.long().view(-1), "bboxes": boxes.bboxes.float(), "batch_idx": batch_idx,
            "gt_groups": gt_groups[:batch_size]}


@HEADS.register("rtdetr_head")
class RTDETRHead(BaseHead):
    """RT-DETR's decoder: input projection of each level, top-k query selection from the encoder
    scores, deformable-attention decoder layers, Hungarian-matched set prediction.

    Training: ``forward(feats)`` returns ``{"feats": [levels]}`` (the decoder inputs, see the module
    docstring); ``decode(output, boxes)`` runs the decoder with denoising queries and returns
    ultralytics' training tuple as a dict: ``dec_bboxes`` (L, B, dn + Q, 4) and ``dec_scores``
    (L, B, dn + Q, nc) for the L decoder layers, ``enc_bboxes`` (B, Q, 4), ``enc_scores``
    (B, Q, nc), ``dn_meta`` (None when the batch has no boxes). Boxes normalised cxcywh, scores logits.

    Eval: ``(pred, raw)``. ``pred`` (B, 4 + num_classes, Q): xywh boxes in input pixels and class
    probabilities of the last decoder layer (the YOLO heads' layout, so the same mAP code, picture
    code and export read it; NMS over DETR queries is harmless). ``raw``: ``pred_boxes`` (B, Q, 4)
    normalised cxcywh and ``pred_logits`` (B, Q, nc). Per-query outputs are not anchor-aligned, so
    they are no student for anchor-wise output distillation (``cls_distill``/``kl_divergence``).
    """

    task = "detection"
    #: Its eval output is an unordered set of queries (tools/export.py compares ONNX and PyTorch as sets).
    set_prediction = True

    def __init__(self, in_specs: Sequence[FeatureSpec], num_classes: int = 80, num_queries: int = 300,
                 hidden_dim: int = 256, num_decoder_layers: int = 6, num_heads: int = 8, num_points: int = 4,
                 ffn_dim: int = 1024, dropout: float = 0.0, eval_idx: int = -1, num_denoising: int = 100,
                 label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0, learnt_init_query: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_queries < 1 or num_decoder_layers < 1:
            raise ValueError(
                f"num_queries and num_decoder_layers must be >= 1, got {num_queries}, {num_decoder_layers}"
            )
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        if not in_specs:
            raise ValueError("rtdetr_head needs at least one input level (the neck's P3-P5)")
        self.num_classes, self.num_queries = num_classes, num_queries
        self.level_names = [s.name for s in in_specs]
        self.stride = int(in_specs[0].stride)  # of the first level: input pixels = its cells x stride
        self.decoder = RTDETRDecoder(
            nc=num_classes, ch=tuple(s.channels for s in in_specs), hd=hidden_dim, nq=num_queries, ndp=num_points,
            nh=num_heads, ndl=num_decoder_layers, d_ffn=ffn_dim, dropout=dropout, eval_idx=eval_idx,
            nd=num_denoising, label_noise_ratio=label_noise_ratio, box_noise_scale=box_noise_scale,
            learnt_init_query=learnt_init_query)

    def _levels(self, feats: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        return [feats[n] for n in self.level_names]

    def _run(self, levels: List[torch.Tensor], targets: Optional[Dict[str, Any]] = None):
        d = self.decoder
        if d.anchors.device != levels[0].device:  # its anchor cache is a plain attribute: rebuilt after .to()
            d.shapes = []
        # tools/export.py sets ultralytics' export flag on every decoder; this head keeps its own
        # eval layout (below) in export too, so the decoder always returns its raw outputs.
        export, d.export = d.export, False
        try:
            return d(levels, targets)
        finally:
            d.export = export

    def decode(self, output: Dict[str, Any], boxes: Optional[GroundTruthBoxes] = None) -> Dict[str, Any]:
        """The training pass of the decoder on ``forward``'s output, with denoising queries built
        from ``boxes`` (none when ``boxes`` is None, empty, or ``num_denoising`` is 0). In eval
        mode ultralytics' decoder gives its last layer only and no denoising (L = 1, dn_meta None)."""
        levels = output["feats"]
        targets = decoder_targets(boxes, levels[0].shape[0]) if boxes is not None else None
        result = self._run(levels, targets)
        dec_bboxes, dec_scores, enc_bboxes, enc_scores, dn_meta = result if self.training else result[1]
        return {"dec_bboxes": dec_bboxes, "dec_scores": dec_scores, "enc_bboxes": enc_bboxes,
                "enc_scores": enc_scores, "dn_meta": dn_meta}

    def forward(self, feats: Dict[str, torch.Tensor]):
        levels = self._levels(feats)
        if self.training:
            return {"feats": levels}
        _, (dec_bboxes, dec_scores, *_) = self._run(levels)
        boxes, logits = dec_bboxes[-1], dec_scores[-1]  # (B, Q, 4) normalised cxcywh, (B, Q, nc)
        # (w, h) of the input from the first level's grid, in the graph (dynamic export sizes)
        size = torch._shape_as_tensor(levels[0])[2:].flip(0).to(boxes) * self.stride
        return self.predictions(boxes, logits, size), {"pred_boxes": boxes, "pred_logits": logits}

    @staticmethod
    def predictions(boxes: torch.Tensor, logits: torch.Tensor, size_wh: torch.Tensor) -> torch.Tensor:
        """(B, Q, 4) normalised cxcywh + (B, Q, nc) logits -> (B, 4 + nc, Q): xywh in input pixels
        (``size_wh``: the input's (w, h)) and class probabilities, the layout DetectionScorer reads."""
        return torch.cat([boxes * size_wh.to(boxes).repeat(2), logits.sigmoid()], -1).permute(0, 2, 1)
