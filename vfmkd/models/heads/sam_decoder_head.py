"""Promptable segmentation head: segment-anything's own prompt encoder and mask decoder on the
student's stride-16 level (the MobileSAM / EdgeSAM student: a small backbone replaces SAM's image
encoder, SAM's decoder is kept)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.official_weights import weights_for
from vfmkd.core.registry import HEADS
from vfmkd.core.sam_variants import SAM_VARIANTS, detect_sam_variant
from vfmkd.models.heads.base import BaseHead

#: SAM's embedding stride (its ViT patch size): the decoder upsamples x4 to masks at stride 4.
EMBED_STRIDE = 16
#: The official checkpoints' input size and embedding grid (what the prompt encoder is built with;
#: :meth:`SamDecoderHead.decode` re-sizes it to the embeddings it is given).
_SAM_INPUT, _SAM_GRID = 1024, 64
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def _level_list(specs: Sequence[FeatureSpec]) -> str:
    return ", ".join(f"{s.name} (stride {s.stride}, {s.channels} ch)" for s in specs)


@HEADS.register("sam_decoder")
class SamDecoderHead(BaseHead):
    """SAM's promptable decoder on a student level.

    ``neck``: SAM's image-encoder neck as an adapter (1x1 conv ``in_level`` channels -> ``embed_dim``,
    LayerNorm2d, 3x3 conv, LayerNorm2d); ``prompt_encoder`` and ``mask_decoder``: segment-anything's
    ``PromptEncoder`` and ``MaskDecoder`` (with ``TwoWayTransformer``), imported and built exactly as
    ``segment_anything.build_sam`` does (256 wide, depth 2, 8 heads, 3 multimask outputs).

    ``forward(feats)`` -> (B, embed_dim, S/16, S/16) image embeddings (train and eval alike: what
    ``embedding_distill`` compares with SAM's ``image_embeddings``). :meth:`decode` prompts them.

    Args:
        in_specs: the neck's levels. ``in_level``: the level to read (default: the one of stride 16;
            another stride is a :class:`ConfigError` naming the stride-16 level to pick).
        embed_dim: SAM's 256 (a multiple of 16; a checkpoint's decoder must have it).
        init_from_teacher: a SAM checkpoint in the official layout (``sam_vit_b_01ec64.pth``): its
            ``prompt_encoder.*`` and ``mask_decoder.*`` weights are loaded (``weights_only``); one
            without them, or whose shapes do not fit, is a :class:`CheckpointError` naming the file.
        variant: the SAM the decoder comes from (vit_b | vit_l | vit_h; the decoders are the same
            size, but a checkpoint whose image encoder is another variant is refused as a mix-up).
        trainable_decoder: False freezes ``prompt_encoder`` and ``mask_decoder`` (gradients still
            flow through them to the backbone).
    """

    task = "promptable"
    stride = EMBED_STRIDE

    def __init__(self, in_specs: Sequence[FeatureSpec], in_level: Optional[str] = None, embed_dim: int = 256,
                 init_from_teacher: Optional[str] = None, variant: str = "vit_b",
                 trainable_decoder: bool = True) -> None:
        super().__init__()
        if variant not in SAM_VARIANTS:
            raise ConfigError(f"sam_decoder: variant must be one of {sorted(SAM_VARIANTS)}, got '{variant}'")
        if embed_dim < 16 or embed_dim % 16:
            raise ConfigError(f"sam_decoder: embed_dim must be a positive multiple of 16 (SAM: 256), got {embed_dim}")
        self.in_level = self.pick_level(in_specs, in_level)
        self.level_names = [self.in_level]
        self.embed_dim, self.variant, self.trainable_decoder = int(embed_dim), variant, bool(trainable_decoder)
        channels = next(s.channels for s in in_specs if s.name == self.in_level)
        self.neck = nn.Sequential(
            nn.Conv2d(channels, embed_dim, kernel_size=1, bias=False), LayerNorm2d(embed_dim),
            nn.Conv2d(embed_dim, embed_dim, kernel_size=3, padding=1, bias=False), LayerNorm2d(embed_dim))
        self.prompt_encoder = PromptEncoder(embed_dim=embed_dim, image_embedding_size=(_SAM_GRID, _SAM_GRID),
                                            input_image_size=(_SAM_INPUT, _SAM_INPUT), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=embed_dim, iou_head_depth=3, iou_head_hidden_dim=256)
        self.init_from_teacher = init_from_teacher
        if init_from_teacher:
            self.load_teacher_decoder(init_from_teacher)
        if not self.trainable_decoder:
            for p in list(self.prompt_encoder.parameters()) + list(self.mask_decoder.parameters()):
                p.requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def pick_level(in_specs: Sequence[FeatureSpec], in_level: Optional[str]) -> str:
        """``in_level`` checked (it must exist and have stride 16), or the level of stride 16."""
        at16 = [s.name for s in in_specs if s.stride == EMBED_STRIDE]
        hint = (f"set in_level: {at16[0]}" if at16 else
                "add 16 to the backbone's strides (e.g. model.backbone.strides=[8,16,32])")
        if in_level is None:
            if not at16:
                raise ConfigError("sam_decoder: SAM's decoder reads stride-16 embeddings and the neck has no "
                                  f"stride-16 level ({_level_list(in_specs)}); {hint}")
            return at16[0]
        spec = next((s for s in in_specs if s.name == in_level), None)
        if spec is None:
            raise ConfigError(f"sam_decoder: in_level '{in_level}' is not a level of the neck "
                              f"({_level_list(in_specs)}); {hint}")
        if spec.stride != EMBED_STRIDE:
            raise ConfigError(f"sam_decoder: in_level '{in_level}' has stride {spec.stride}, but SAM's decoder reads "
                              f"stride-16 embeddings (its masks come out at stride 4); {hint}")
        return in_level

    def load_teacher_decoder(self, path: str) -> None:
        """Load ``prompt_encoder.*`` / ``mask_decoder.*`` of an official SAM checkpoint (weights_only)."""
        from vfmkd.core.config import resolve_path
        from vfmkd.utils.checkpoint import load_checkpoint, unwrap_state_dict

        p = resolve_path(path)
        state = unwrap_state_dict(load_checkpoint(p, download_hint=weights_for("sam", self.variant).download_command))
        if any(k.startswith("image_encoder.") for k in state):
            found = detect_sam_variant(state, source=f"init_from_teacher checkpoint {p}")
            if found != self.variant:
                raise CheckpointError(f"init_from_teacher checkpoint {p} is SAM {found}, but the head's variant is "
                                      f"{self.variant}; set variant: {found} (or use the {self.variant} checkpoint)")
        for prefix, module in zip(DECODER_PREFIXES, (self.prompt_encoder, self.mask_decoder)):
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                raise CheckpointError(
                    f"init_from_teacher checkpoint {p} holds no {prefix}* weights (first keys: "
                    f"{', '.join(list(state)[:4])}): its decoder does not fit sam_decoder; use an official SAM "
                    f"checkpoint (sam_vit_b_01ec64.pth, python tools/download_weights.py --list)")
            own = module.state_dict()
            missing = sorted(set(own) - set(part))
            extra = sorted(set(part) - set(own))
            shapes = [f"{k} {tuple(part[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                      if k in part and tuple(part[k].shape) != tuple(v.shape)]
            if missing or extra or shapes:
                why = "; ".join(x for x in (
                    f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                    f"shapes differ: {shapes[:3]}" if shapes else "") if x)
                raise CheckpointError(
                    f"init_from_teacher checkpoint {p}: its {prefix[:-1]} does not fit sam_decoder "
                    f"(embed_dim {self.embed_dim}): {why}. Use a SAM (v1) checkpoint in the official layout.")
            module.load_state_dict({k: v.to(own[k].dtype) for k, v in part.items()}, strict=True)

    # ------------------------------------------------------------------ forward
    def forward(self, feats: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.neck(feats[self.in_level])

    def _fit_prompt_encoder(self, grid_hw: Tuple[int, int]) -> None:
        """The prompt encoder's sizes follow the embeddings: canvas 16 h x 16 w, grid h x w."""
        h, w = int(grid_hw[0]), int(grid_hw[1])
        pe = self.prompt_encoder
        pe.input_image_size = (EMBED_STRIDE * h, EMBED_STRIDE * w)
        pe.image_embedding_size = (h, w)
        pe.mask_input_size = (4 * h, 4 * w)

    def decode(self, embeddings: torch.Tensor, batch_idx: torch.Tensor, boxes: Optional[torch.Tensor] = None,
               points: Optional[torch.Tensor] = None, point_labels: Optional[torch.Tensor] = None,
               mask_input: Optional[torch.Tensor] = None, multimask_output: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt the image embeddings; one prompt set per row.

        Args:
            embeddings: (B, E, h, w) from :meth:`forward`.
            batch_idx: (N,) int64 image of each prompt set.
            boxes: (N, 4) x1, y1, x2, y2 in student-canvas pixels (S = 16 h).
            points: (N, P, 2) x, y canvas pixels, with ``point_labels`` (N, P) (1 foreground,
                0 background, -1 ignored; default all 1).
            mask_input: (N, 1, 4h, 4w) previous low-res logits (SAM's refinement input).
            multimask_output: SAM's 3 masks instead of 1.

        Returns:
            (low_res_logits (N, C, 4h, 4w) on the student canvas at stride 4, iou_pred (N, C)), C = 3
            with ``multimask_output`` else 1: exactly SAM's ``MaskDecoder`` output per image.
        """
        if boxes is None and points is None:
            raise ValueError("sam_decoder.decode needs boxes and/or points")
        b, _, h, w = embeddings.shape
        n = int(batch_idx.shape[0])
        for name, t, shape in (("boxes", boxes, (n, 4)), ("mask_input", mask_input, (n, 1, 4 * h, 4 * w))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"sam_decoder.decode: {name} must be {shape}, got {tuple(t.shape)}")
        if points is not None and (points.ndim != 3 or points.shape[0] != n or points.shape[2] != 2):
            raise ValueError(f"sam_decoder.decode: points must be ({n}, P, 2), got {tuple(points.shape)}")
        c = 3 if multimask_output else 1
        device = embeddings.device
        if n == 0:
            return embeddings.new_zeros((0, c, 4 * h, 4 * w)), embeddings.new_zeros((0, c))
        idx = batch_idx.long().to(device)
        if int(idx.min()) < 0 or int(idx.max()) >= b:
            raise ValueError(f"sam_decoder.decode: batch_idx must lie in [0, {b}), got {idx.min()}..{idx.max()}")
        self._fit_prompt_encoder((h, w))
        point_arg = None
        if points is not None:
            labels = torch.ones(points.shape[:2], device=device, dtype=torch.int) if point_labels is None \
                else point_labels.to(device=device, dtype=torch.int)
            point_arg = (points.to(device=device, dtype=torch.float32), labels)
        sparse, dense = self.prompt_encoder(
            points=point_arg, boxes=None if boxes is None else boxes.to(device=device, dtype=torch.float32),
            masks=None if mask_input is None else mask_input.to(device=device, dtype=torch.float32))
        dense_pe = self.prompt_encoder.get_dense_pe()
        order, logits, ious = [], [], []
        for img in torch.unique(idx).tolist():  # SAM's decoder takes one image and all its prompts
            rows = torch.nonzero(idx == img).view(-1)
            low, iou = self.mask_decoder(image_embeddings=embeddings[img:img + 1], image_pe=dense_pe,
                                         sparse_prompt_embeddings=sparse[rows], dense_prompt_embeddings=dense[rows],
                                         multimask_output=multimask_output)
            order.append(rows)
            logits.append(low)
            ious.append(iou)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(logits)[inverse], torch.cat(ious)[inverse]
