"""Trainable LoRA adapters on SAM's image-encoder ``attn.qkv`` layers, and the file the ``lora_sam``
teacher loads (vfmkd's layout, :mod:`vfmkd.teachers.lora_formats`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from vfmkd.teachers.lora_formats import VFMKD_FORMAT, lora_key
from vfmkd.utils.checkpoint import save_checkpoint


class LoraQkv(nn.Module):
    """SAM's fused ``qkv`` Linear, frozen, plus a trainable low-rank update:
    ``y = x W^T + b + (alpha / r) x A^T B^T`` for ``x`` (..., C) -> (..., 3C). ``lora_A`` (r, C) starts
    kaiming-uniform and ``lora_B`` (3C, r) at zero (PEFT's init), so training starts from the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)
        return self.base(x) + self.scaling * update


def attach_lora(sam: nn.Module, rank: int, alpha: float) -> List[LoraQkv]:
    """Wrap every image-encoder block's ``attn.qkv`` of ``sam`` (a segment-anything ``Sam``) in a
    :class:`LoraQkv`; the base weights stay frozen. Returns the adapters in block order."""
    adapters = []
    for block in sam.image_encoder.blocks:
        block.attn.qkv.requires_grad_(False)
        block.attn.qkv = LoraQkv(block.attn.qkv, rank, alpha)
        adapters.append(block.attn.qkv)
    return adapters


def lora_state(adapters: List[LoraQkv]) -> Dict[str, torch.Tensor]:
    """The adapters as vfmkd's LoRA keys, float32 on CPU."""
    out = {}
    for i, adapter in enumerate(adapters):
        out[lora_key(i, "A")] = adapter.lora_A.detach().float().cpu().clone()
        out[lora_key(i, "B")] = adapter.lora_B.detach().float().cpu().clone()
    return out


def load_lora_state(adapters: List[LoraQkv], state: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            adapter.lora_A.copy_(state[lora_key(i, "A")])
            adapter.lora_B.copy_(state[lora_key(i, "B")])


def write_teacher_file(path: Path, adapters: List[LoraQkv], rank: int, alpha: float, variant: str,
                       base_checkpoint: Optional[str], mask_decoder: Optional[nn.Module]) -> Path:
    """Write (atomically) the file ``teachers.lora_sam.lora_checkpoint`` takes: the LoRA matrices, the
    fine-tuned mask decoder's tensors (``mask_decoder.*``) when it was trained, rank, alpha and base."""
    state: Dict[str, Any] = dict(lora_state(adapters))
    if mask_decoder is not None:
        state.update({f"mask_decoder.{k}": v.detach().float().cpu().clone()
                      for k, v in mask_decoder.state_dict().items()})
    return save_checkpoint(path, {"format": VFMKD_FORMAT, "lora_rank": rank, "lora_alpha": float(alpha),
                                  "variant": variant, "base_checkpoint": base_checkpoint or "", "state_dict": state})
