"""SAM's image encoder on the fast path (``teacher.backend: fast``): the same weights and the same maths,
attention through ``F.scaled_dot_product_attention``.

segment-anything computes attention by hand: ``softmax((q * scale) @ k^T + rel_pos) @ v`` materialises
the (HW x HW) score matrix per head in fp32 (4096 x 4096 in the global blocks at 1024). The fast path
hands the same terms to SDPA, with SAM's decomposed relative-position bias as ``attn_mask`` (SDPA adds
the mask to the scaled scores before the softmax, which is exactly SAM's order), so fused kernels
(memory-efficient attention on CUDA, the flash CPU kernel) do the softmax and the products.

Why not timm's ``samvit_*`` (the same encoder with fused attention; ``checkpoint_filter_fn`` converts the
official weights): it would be a second model beside the segment-anything one that the prompt path (mask
decoder), the LoRA merges and the input-size resizing (pos_embed, relative-position tables) work on, with
its own resizing code. Swapping the attention of the library's own modules keeps one model and everything
else identical.
The relative-position bias is ``add_decomposed_rel_pos``'s two einsums on the library's ``get_rel_pos``
tables, summed without the score matrix (that function adds them to one, which SDPA never materialises).

The class swap is per module instance (``attn.__class__``): other SAM models in the process keep the
stock forward. Features match the stock path within float32 rounding (tests/test_teacher_backend.py:
max |fast - stock| <= 1e-4 x max |stock| on the same random weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos
from torch import nn

#: ``teacher.backend`` values: ``fast`` (SDPA attention, channels_last convs) | ``stock`` (segment-anything as is)
BACKENDS = ("fast", "stock")


class SdpaAttention(Attention):
    """segment-anything's ``Attention`` (same parameters: ``qkv``, ``proj``, ``rel_pos_h/w``) with the
    product computed by SDPA. ``forward``: x (B, H, W, C) -> (B, H, W, C), as the stock module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # (3, B, heads, H*W, head_dim), the stock layout
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, h, w) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """SAM's decomposed relative-position term for queries ``q`` (B, heads, h*w, d) -> (B, heads, h*w, h*w):
    ``add_decomposed_rel_pos`` without the score matrix it adds to (its einsums on the library's
    ``get_rel_pos`` tables), so the bias is the only (h*w)^2 buffer."""
    b, heads, _, d = q.shape
    r_q = q.reshape(b * heads, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, rel_pos_w).to(q.dtype))
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, heads, h * w, h * w)


def set_backend(encoder: ImageEncoderViT, backend: str) -> None:
    """Switch every attention module of ``encoder`` to ``backend`` in place (the weights are untouched);
    ``fast`` also lays the convolutions (patch embedding, neck) out channels_last, the layout the trunk
    reaches the neck in (SAM's blocks are (B, H, W, C))."""
    cls = SdpaAttention if backend == "fast" else Attention
    for module in encoder.modules():
        if isinstance(module, Attention):
            module.__class__ = cls
    layout = torch.channels_last if backend == "fast" else torch.contiguous_format
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=layout)
