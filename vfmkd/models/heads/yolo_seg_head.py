"""YOLOv8 instance-segmentation head: ultralytics' ``Segment`` (boxes + classes + mask coefficients
over prototype masks) in its v8 (legacy) form."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from ultralytics.nn.modules import Segment
from ultralytics.utils.tal import make_anchors
from ultralytics.utils.torch_utils import initialize_weights

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS
from vfmkd.models.heads.base import BaseHead


class V8Segment(Segment):
    """ultralytics' Segment with YOLOv8's plain-conv classification branch (see ``V8Detect``)."""

    legacy = True


@HEADS.register("yolo_seg_head")
class YOLOv8SegmentHead(BaseHead):
    """Anchor-free detection with DFL box regression plus ``num_masks`` mask coefficients per anchor
    over ``num_masks`` prototype masks made from the finest level (upsampled x2: stride 4 on a P3-P5
    neck, i.e. S/4 x S/4 like ultralytics' ``mask_ratio`` 4).

    Training: ``forward({"P3": ..., ...})`` returns ultralytics' raw dict: ``boxes`` (B, 4*reg_max, A),
    ``scores`` (B, num_classes, A) logits, ``feats`` (the input levels), ``mask_coefficient``
    (B, num_masks, A) and ``proto`` (B, num_masks, S/4, S/4); ``v8SegmentationLoss`` consumes it.
    Eval: ``((decoded, proto), raw)`` with ``decoded`` (B, 4 + num_classes + num_masks, A): xywh boxes
    in input pixels, class probabilities, mask coefficients. A is the number of cells over all levels.

    The ultralytics module is ``self.detect`` (as in ``yolo_head``), so code that reads the
    detection part of a head (strides, ``nc``, ``reg_max``) treats both heads alike.
    """

    task = "instance"

    def __init__(self, in_specs: Sequence[FeatureSpec], num_classes: int = 80, reg_max: int = 16,
                 num_masks: int = 32, num_protos: int = 256) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_masks < 1 or num_protos < 1:
            raise ValueError(f"num_masks and num_protos must be >= 1, got {num_masks}, {num_protos}")
        self.num_classes, self.num_masks = num_classes, num_masks
        self.level_names = [s.name for s in in_specs]
        self.proto_stride = in_specs[0].stride / 2  # Proto upsamples the first level x2
        self.detect = V8Segment(nc=num_classes, nm=num_masks, npr=num_protos, reg_max=reg_max,
                                ch=tuple(s.channels for s in in_specs))
        self.detect.stride = torch.tensor([float(s.stride) for s in in_specs])
        self.detect.bias_init()
        initialize_weights(self)  # YOLOv8's BatchNorm settings, as ultralytics builds it

    def forward(self, feats: Dict[str, torch.Tensor]):
        return self.detect([feats[n] for n in self.level_names])

    @staticmethod
    def raw(output: Any) -> Dict[str, torch.Tensor]:
        """The raw prediction dict of a training (dict) or eval (tuple) output."""
        return output if isinstance(output, dict) else output[1]

    def match_anchors(self, output: Any, boxes_xyxy: torch.Tensor, cls: torch.Tensor,
                      batch_idx: torch.Tensor) -> torch.Tensor:
        """The anchor (index into A) that stands for each ground-truth instance.

        Rule: anchors are decoded with ultralytics' ``make_anchors`` (cell centres, offset 0.5, in
        input pixels). Among the anchors of image ``batch_idx[n]`` whose centre lies strictly inside
        box ``n``, the one with the highest predicted score (logit) for class ``cls[n]`` wins; when
        no anchor centre lies inside the box (a box smaller than a stride-8 cell), the anchor whose
        centre is nearest the box centre (Euclidean, in pixels) is used. Ties go to the lowest index.

        ``boxes_xyxy`` (N, 4) in input (canvas) pixels, ``cls`` (N,) class ids, ``batch_idx`` (N,)
        image index -> (N,) int64.
        """
        raw = self.raw(output)
        scores = raw["scores"]  # (B, nc, A)
        n = boxes_xyxy.shape[0]
        if n == 0:
            return torch.zeros(0, dtype=torch.long, device=scores.device)
        points, stride = make_anchors(raw["feats"], self.detect.stride.to(scores.device), 0.5)
        centres = points * stride  # (A, 2) input pixels
        boxes = boxes_xyxy.to(centres)
        b, c = batch_idx.long().to(scores.device), cls.long().to(scores.device)
        cx, cy = centres[:, 0].unsqueeze(0), centres[:, 1].unsqueeze(0)  # (1, A)
        inside = ((cx > boxes[:, 0:1]) & (cx < boxes[:, 2:3]) & (cy > boxes[:, 1:2]) & (cy < boxes[:, 3:4]))  # (N, A)
        cls_score = scores.detach()[b, c].float()  # (N, A): score of the GT class at every anchor
        best_inside = cls_score.masked_fill(~inside, float("-inf")).argmax(1)
        box_centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        nearest = torch.cdist(box_centre, centres).argmin(1)
        return torch.where(inside.any(1), best_inside, nearest)

    def instance_mask_logits(self, output: Any, boxes_xyxy: torch.Tensor, cls: torch.Tensor,
                             batch_idx: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, S/4, S/4) of the student anchor matched to each ground-truth instance
        (:meth:`match_anchors`): its mask coefficients times its image's prototypes. Differentiable
        in both (what ``mask_distill`` trains); the box crop is left to the caller."""
        raw = self.raw(output)
        coef, proto = raw["mask_coefficient"], raw["proto"]  # (B, nm, A), (B, nm, h, w)
        anchors = self.match_anchors(output, boxes_xyxy, cls, batch_idx)
        b = batch_idx.long().to(proto.device)
        picked = coef[b, :, anchors]  # (N, nm)
        return torch.einsum("nm,nmhw->nhw", picked, proto[b])
