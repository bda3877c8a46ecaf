"""A vision Mamba student: VMamba-style 2-D selective-scan (SS2D) blocks in four stages.

Layout: a stride-4 convolutional patch embedding, then stages at strides 4/8/16/32 separated by
stride-2 convolutions; each block is ``x + SS2D(LN(x))`` then ``x + MLP(LN(x))``. SS2D flattens the
feature map in several orders (``scan="cross"``: row-major, column-major and both reversed, as in
VMamba; ``scan="bi"``: row-major forwards and backwards, as in Vim), runs one selective scan per
order with its own parameters (all orders in one call, as channel groups) and sums the orders back
onto the grid.

The scan runs on mamba-ssm's CUDA kernel when the tensors are on CUDA and the optional extra is
installed, otherwise on a pure-PyTorch chunked scan (``vfmkd/models/backbones/selective_scan.py``;
the path used is logged once). To get the kernel on a CUDA machine::

    pip install -e ".[mamba]"      # or: MAMBA_FORCE_BUILD=TRUE pip install "mamba-ssm>=2.2" --no-build-isolation
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import nn

from vfmkd.core.errors import ConfigError, did_you_mean
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import BACKBONES
from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.backbones.selective_scan import selective_scan, selective_scan_flops


class MambaSpec(NamedTuple):
    dims: Tuple[int, int, int, int]  # channels of the stages at strides 4/8/16/32
    depths: Tuple[int, int, int, int]  # blocks per stage
    d_state: int  # N, the SSM state size per channel
    expand: float  # SSM channels = expand * dim
    mlp_ratio: float  # hidden width of each block's MLP (0: no MLP)


# VMamba v2's block recipe (small state, ratio-1 SSM, an MLP per block) at student widths.
MAMBA_VARIANTS: Dict[str, MambaSpec] = {
    "tiny": MambaSpec((48, 96, 192, 384), (1, 2, 4, 2), d_state=4, expand=1.0, mlp_ratio=3.0),
    "small": MambaSpec((64, 128, 256, 512), (2, 2, 6, 2), d_state=8, expand=1.0, mlp_ratio=4.0),
}
SCANS = {"cross": 4, "bi": 2}
STAGE_STRIDES = (4, 8, 16, 32)


def cross_scan(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, k, C, H*W): the orders in which SS2D reads the grid."""
    rows = x.flatten(2)
    if k == 2:
        return torch.stack([rows, rows.flip(-1)], dim=1)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, k, C, H*W) -> (B, C, H*W) in row-major order: undo each order and sum."""
    b, k, c, _ = y.shape
    out = y[:, 0] + y[:, k // 2].flip(-1)
    if k == 4:
        cols = y[:, 1] + y[:, 3].flip(-1)
        out = out + cols.view(b, c, w, h).transpose(2, 3).reshape(b, c, h * w)
    return out


class SS2D(nn.Module):
    """2-D selective scan on a channels-last map: ``(B, H, W, C) -> (B, H, W, C)``."""

    def __init__(self, dim: int, d_state: int, expand: float, scan: str, d_conv: int = 3,
                 dt_min: float = 0.001, dt_max: float = 0.1) -> None:
        super().__init__()
        self.k, self.d_state = SCANS[scan], d_state
        self.inner = inner = int(expand * dim)
        self.dt_rank = rank = math.ceil(dim / 16)
        k = self.k
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)  # x and the gate z
        self.conv = nn.Conv2d(inner, inner, d_conv, padding=d_conv // 2, groups=inner)
        # One set of SSM parameters per scan order, applied to all orders at once.
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(k, inner, rank))
        # dt bias, A and D are stored 1-D so the trainer's optimizer leaves them out of weight decay
        # (Mamba's recipe); A = -exp(A_log) is (k * inner, d_state), initialised to -[1..N].
        self.dt_proj_bias = nn.Parameter(torch.empty(k * inner))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * inner))
        self.D = nn.Parameter(torch.ones(k * inner))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        # Mamba's initialisation: dt = softplus(bias) log-uniform in [dt_min, dt_max].
        with torch.no_grad():
            nn.init.uniform_(self.x_proj_weight, -inner ** -0.5, inner ** -0.5)
            nn.init.uniform_(self.dt_proj_weight, -rank ** -0.5, rank ** -0.5)
            dt = torch.exp(torch.rand(k,
                                      inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
            self.dt_proj_bias.copy_((dt + torch.log(-torch.expm1(-dt))).flatten())  # inverse softplus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv(x.permute(0, 3, 1, 2)))  # (B, E, H, W)
        xs = cross_scan(x, self.k)  # (B, k, E, L)
        x_dbl = torch.einsum("bkel,kce->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,ker->bkel", dts, self.dt_proj_weight)
        L = h * w
        y = selective_scan(
            xs.reshape(b, -1, L), dts.reshape(b, -1, L), -torch.exp(self.A_log.float()).view(-1, self.d_state), Bs, Cs,
            D=self.D, delta_bias=self.dt_proj_bias, delta_softplus=True,
        ).view(b, self.k, self.inner, L)
        y = cross_merge(y, h, w).transpose(1, 2).reshape(b, h, w, self.inner)
        return self.out_proj(self.out_norm(y) * F.silu(z))

    def scan_flops(self, batch: int, h: int, w: int) -> int:
        return selective_scan_flops(batch, self.k * self.inner, h * w, self.d_state)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class VSSBlock(nn.Module):
    """``x + SS2D(LN(x))``, then ``x + MLP(LN(x))`` on a channels-last map."""

    def __init__(self, dim: int, spec: MambaSpec, scan: str, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.ssm = SS2D(dim, spec.d_state, spec.expand, scan)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = None
        if spec.mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * spec.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ssm(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def resolve_variant(variant: str) -> MambaSpec:
    if variant not in MAMBA_VARIANTS:
        raise ConfigError(f"unknown mamba variant '{variant}'.{did_you_mean(variant, MAMBA_VARIANTS)} "
                          f"Choose from {', '.join(MAMBA_VARIANTS)}.")
    return MAMBA_VARIANTS[variant]


@BACKBONES.register("mamba")
class MambaBackbone(BaseBackbone):
    """Vision Mamba (VMamba-style SS2D). ``forward((B, 3, H, W))`` -> ``{"P3": (B, C3, H/8, W/8),
    "P4": (B, C4, H/16, W/16), "P5": (B, C5, H/32, W/32)}``; tiny gives C3/C4/C5 = 96/192/384.

    ``strides`` picks the returned stages from 4/8/16/32 (stages past the deepest one are not
    built); ``scan`` is ``cross`` (4 orders) or ``bi`` (2); ``d_state``/``expand`` override the
    variant's SSM size. H and W should be multiples of the deepest stride.
    """

    def __init__(
        self,
        variant: str = "tiny",
        strides: Sequence[int] = (8, 16, 32),
        scan: str = "cross",
        d_state: Optional[int] = None,
        expand: Optional[float] = None,
        drop_path_rate: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        spec = resolve_variant(variant)
        spec = spec._replace(d_state=d_state or spec.d_state, expand=expand or spec.expand)
        if scan not in SCANS:
            raise ConfigError(
                f"unknown mamba scan '{scan}'.{did_you_mean(scan, SCANS)} Choose from {', '.join(SCANS)}."
            )
        strides = [int(s) for s in strides]
        bad = [s for s in strides if s not in STAGE_STRIDES]
        if bad or not strides or sorted(set(strides)) != strides:
            raise ConfigError(f"mamba strides must be increasing values from {STAGE_STRIDES}, got {strides}")
        self.variant, self.scan = variant, scan
        n_stages = STAGE_STRIDES.index(strides[-1]) + 1
        dims, depths = spec.dims[:n_stages], spec.depths[:n_stages]
        d0 = dims[0]
        self.patch_embed = nn.Sequential(  # stride 4, channels first
            nn.Conv2d(in_channels, d0 // 2, 3, 2, 1), LayerNorm2d(d0 // 2), nn.GELU(),
            nn.Conv2d(d0 // 2, d0, 3, 2, 1), LayerNorm2d(d0),
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.downsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            self.downsamples.append(
                nn.Identity() if i == 0 else nn.Sequential(nn.Conv2d(dims[i - 1], dim, 3, 2, 1), LayerNorm2d(dim))
            )
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*(VSSBlock(dim, spec, scan, rates[first + j]) for j in range(depth))))
        self._levels = {STAGE_STRIDES.index(s): f"P{int(math.log2(s))}" for s in strides}
        self.out_norms = nn.ModuleDict({name: nn.LayerNorm(dims[i]) for i, name in self._levels.items()})
        self._specs = tuple(FeatureSpec(name, dims[i], STAGE_STRIDES[i]) for i, name in self._levels.items())
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return self._specs

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.patch_embed(x)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, (down, stage) in enumerate(zip(self.downsamples, self.stages)):
            x = down(x)  # channels first between stages
            y = stage(x.permute(0, 2, 3, 1))  # blocks run channels last
            if i in self._levels:
                name = self._levels[i]
                out[name] = self.out_norms[name](y).permute(0, 3, 1, 2).contiguous()
            x = y.permute(0, 3, 1, 2)
        return out

    def scan_flops(self, batch: int, h: int, w: int) -> int:
        """Elementwise FLOPs of all selective scans for a (batch, 3, h, w) input, which matmul/conv
        FLOP counters do not see (VMamba's count)."""
        total = 0
        for i, stage in enumerate(self.stages):
            s = STAGE_STRIDES[i]
            total += sum(block.ssm.scan_flops(batch, h // s, w // s) for block in stage)
        return total
