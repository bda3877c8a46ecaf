"""SAM (segment-anything v1) image-encoder sizes and how to tell them apart in a state_dict.

Shared by the SAM teachers and the student's ``sam_decoder`` head (which loads SAM's decoder from
the same official files), so neither imports the other.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Tuple

import torch

from vfmkd.core.errors import CheckpointError

# (embed dim, number of ViT blocks) of each official image encoder; used to recognise a checkpoint.
SAM_VARIANTS: Dict[str, Tuple[int, int]] = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_RE = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def detect_sam_variant(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """Name the SAM variant (vit_b|vit_l|vit_h) a state_dict belongs to, from tensor shapes only."""
    if _PATCH_KEY not in state_dict:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(
            f"{source} is not a SAM (segment-anything v1) state_dict: it has no '{_PATCH_KEY}' "
            f"(first keys: {sample}). Use an official SAM checkpoint "
            "(python tools/download_weights.py --list)."
        )
    dim = int(state_dict[_PATCH_KEY].shape[0])
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))})
    for name, shape in SAM_VARIANTS.items():
        if shape == (dim, depth):
            return name
    raise CheckpointError(
        f"{source} has a SAM-like image encoder of unknown size (embed dim {dim}, {depth} blocks); "
        f"known: {', '.join(f'{n}={d}x{b}' for n, (d, b) in SAM_VARIANTS.items())}."
    )
