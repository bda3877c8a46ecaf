"""RT-DETR detection task loss: ultralytics' ``RTDETRDetectionLoss`` on the student's ``rtdetr_head``."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from ultralytics.models.utils.loss import RTDETRDetectionLoss as _UltralyticsRTDETRLoss

from vfmkd.core.registry import LOSSES
from vfmkd.datasets.records import Batch
from vfmkd.distillation.losses.task import TaskLoss, graph_zero, labelled_boxes
from vfmkd.models.heads.rtdetr_head import RTDETRHead, decoder_targets

#: Each of ultralytics' loss terms (``loss_class``, ``loss_bbox``, ``loss_giou``, their ``_aux`` and
#: ``_dn`` variants) is summed into the part named after its stem.
PARTS = {"loss_class": "cls", "loss_bbox": "l1", "loss_giou": "giou"}


@LOSSES.register("rtdetr_detection")
class RTDETRDetectionLoss(TaskLoss):
    """Hungarian-matched set loss of RT-DETR, as ``RTDETRDetectionModel.loss`` computes it: varifocal
    classification + L1 + GIoU on the last decoder layer, the same on the encoder's query selection
    and every earlier layer (auxiliary), and on the denoising queries.

    ``__call__(head_output, batch)`` takes the head's training output (``{"feats": levels}``), runs
    the head's decoder with the batch's boxes (denoising queries, :meth:`RTDETRHead.decode`) and
    returns the scalar loss and its detached parts ``cls``/``l1``/``giou`` (each summed over the
    main, auxiliary and denoising terms, with ultralytics' gains; they sum to the loss). ultralytics
    normalises each term by the number of ground-truth boxes of the batch.
    """

    def __init__(self, head: RTDETRHead, cls: float = 1.0, l1: float = 5.0, giou: float = 2.0,
                 use_vfl: bool = True, aux_loss: bool = True) -> None:
        if not isinstance(head, RTDETRHead) and not callable(getattr(head, "decode", None)):
            raise TypeError(f"rtdetr_detection needs an rtdetr_head (head: <its name>), got {type(head).__name__}")
        self.head = head
        self._loss = _UltralyticsRTDETRLoss(nc=head.num_classes, loss_gain={"class": cls, "bbox": l1, "giou": giou},
                                            aux_loss=aux_loss, use_vfl=use_vfl)

    def __call__(self, head_output: Mapping[str, Any], batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if not isinstance(head_output, Mapping) or "feats" not in head_output:
            raise TypeError("rtdetr_detection reads the training output of an rtdetr_head ({'feats': levels}); got "
                            f"{type(head_output).__name__} (is the head in eval mode, or is 'head:' another head?)")
        labelled_output, boxes, images = labelled_boxes(head_output, batch)  # unlabelled images left out
        if not images:
            zero = graph_zero(*head_output["feats"])
            return zero, {k: zero.detach() for k in PARTS.values()}
        levels = labelled_output["feats"]
        out = self.head.decode(labelled_output, boxes)
        targets = decoder_targets(boxes, levels[0].shape[0])
        targets = {k: v.to(levels[0].device) if torch.is_tensor(v) else v for k, v in targets.items()}
        dec_bboxes, dec_scores, dn_meta = out["dec_bboxes"], out["dec_scores"], out["dn_meta"]
        dn_bboxes: Optional[torch.Tensor] = None
        dn_scores: Optional[torch.Tensor] = None
        if dn_meta is not None:
            dn_bboxes, dec_bboxes = torch.split(dec_bboxes, dn_meta["dn_num_split"], dim=2)
            dn_scores, dec_scores = torch.split(dec_scores, dn_meta["dn_num_split"], dim=2)
        dec_bboxes = torch.cat([out["enc_bboxes"].unsqueeze(0), dec_bboxes])  # (1 + L, B, Q, 4)
        dec_scores = torch.cat([out["enc_scores"].unsqueeze(0), dec_scores])
        if dn_bboxes is not None and dn_scores is not None:
            dn_bboxes, dn_scores = dn_bboxes.float(), dn_scores.float()
        terms = self._loss((dec_bboxes.float(), dec_scores.float()), targets, dn_bboxes=dn_bboxes, dn_scores=dn_scores,
                           dn_meta=dn_meta)
        total = sum(terms.values())
        parts: Dict[str, torch.Tensor] = {}
        for key, value in terms.items():
            stem = next(s for s in PARTS if key.startswith(s))
            parts[PARTS[stem]] = parts.get(PARTS[stem], 0.0) + value.detach()
        return total, parts
