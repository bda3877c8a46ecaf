"""The selective scan of Mamba (S6), with a CUDA kernel when available and a pure-PyTorch path.

``selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`` has the semantics of
``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` (real ``A`` only)::

    delta  = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t       h: (batch, D, N) per step
    y_t    = <h_t, C_t> + D * u_t ;   out = y * silu(z)              (D and z optional)

Shapes: ``u, delta, z``: (batch, dim, L); ``A``: (dim, N); ``B, C``: (dim, N) (time-invariant),
(batch, N, L) (shared by all channels) or (batch, G, N, L) (G groups of dim / G channels);
``D, delta_bias``: (dim,). Returns (batch, dim, L) in ``u``'s dtype (maths in float32).

Which path runs:
* CUDA tensors with ``mamba_ssm`` importable: ``mamba_ssm``'s fused kernel ``selective_scan_fn``.
  mamba-ssm is the optional extra ``vfmkd[mamba]``; it compiles against the local CUDA toolkit::

      MAMBA_FORCE_BUILD=TRUE pip install "mamba-ssm>=2.2" --no-build-isolation

* anything else (CPU, or the package missing): :func:`selective_scan_torch`, a chunked scan in
  plain PyTorch (autograd-friendly, float32). Which path is used is logged once per path.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

logger = logging.getLogger("vfmkd")
_LOGGED: set = set()

try:  # optional CUDA kernel
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:  # ImportError, or a build against another torch/CUDA
    _mamba_selective_scan_fn = None

__all__ = ["selective_scan", "selective_scan_torch", "mamba_ssm_available", "selective_scan_flops"]


def mamba_ssm_available() -> bool:
    """True when mamba-ssm's CUDA selective-scan kernel could be imported."""
    return _mamba_selective_scan_fn is not None


def _log_once(key: str, message: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(message)


def _chunk_size(L: int) -> int:
    """Steps per chunk: a divisor of L near sqrt(L) (no padding), else ceil(sqrt(L))."""
    root = math.isqrt(L)
    for t in range(root, max(1, root // 2) - 1, -1):
        if L % t == 0 and t >= max(1, root // 2):
            return t
    return math.ceil(math.sqrt(L))


def _time_major(x: torch.Tensor, T: int, pad: int) -> torch.Tensor:
    """(batch, dim, L) -> contiguous (T, batch, dim, chunks): step t of every chunk in one slice."""
    if pad:
        x = F.pad(x, (0, pad))
    batch, dim, length = x.shape
    return x.view(batch, dim, length // T, T).permute(3, 0, 1, 2).contiguous()


def _bc_time_major(P: torch.Tensor, dim: int, T: int, pad: int) -> torch.Tensor:
    """B or C -> (T|1, batch|1, G, 1, chunks|1, N) broadcastable against (T, batch, G, dim / G, chunks, N)."""
    if P.dim() == 2:  # (dim, N): time invariant, G = dim
        return P.float()[None, None, :, None, None, :]
    if P.dim() == 3:  # (batch, N, L): shared by every channel, G = 1
        P = P[:, None]
    if P.dim() != 4:
        raise ValueError(f"selective scan: B/C must have 2, 3 or 4 dims, got shape {tuple(P.shape)}")
    batch, groups, n, _ = P.shape  # (batch, G, N, L): groups of dim / G channels
    if dim % groups:
        raise ValueError(f"selective scan: {dim} channels do not split into {groups} groups of B/C")
    P = F.pad(P.float(), (0, pad)) if pad else P.float()
    P = P.view(batch, groups, n, -1, T).permute(4, 0, 1, 3, 2).contiguous()  # (T, batch, G, chunks, N)
    return P[:, :, :, None]


def _groups(P: torch.Tensor, dim: int) -> int:
    return dim if P.dim() == 2 else 1 if P.dim() == 3 else P.shape[1]


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Pure-PyTorch selective scan (``selective_scan_ref`` maths), vectorised over batch, channels
    and states, sequential over time in two levels.

    The sequence is cut into chunks of ``T`` steps (default: a divisor of L near ``sqrt(L)``). A
    loop of ``T`` steps runs the recurrence inside every chunk at once from a zero state; a loop
    over the chunks then carries the end states across them; finally each step adds its chunk's
    incoming state times the decay accumulated since the chunk start (``exp`` of a cumulative sum
    of ``delta * A``: products of factors in (0, 1], no overflow). That is ``T + L / T`` Python
    steps instead of ``L`` (64 instead of 1024 at L = 1024), with the same result up to float32
    rounding. The state tensors are laid out time-major, (T, batch, dim, chunks, N), so every step
    reads and writes contiguous memory; memory is a few (batch, dim, L, N) float32 tensors, as in
    ``selective_scan_ref``.
    """
    if A.is_complex():
        raise ValueError("selective_scan_torch takes a real A (vision Mamba uses real A); got a complex tensor")
    dtype_in = u.dtype
    batch, dim, L = u.shape
    n = A.shape[1]
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    T = max(1, min(L, int(chunk_size or _chunk_size(L))))
    n_chunks = -(-L // T)
    pad = n_chunks * T - L  # padded steps neither decay (delta = 0) nor drive the state

    dt = _time_major(delta, T, pad)  # (T, batch, dim, chunks)
    log_decay = dt[..., None] * A.float()[:, None, :]  # (T, batch, dim, chunks, N), <= 0 for A < 0
    gb, gc = _groups(B, dim), _groups(C, dim)
    du = _time_major(delta * u, T, pad)
    drive = (du.view(T, batch, gb, dim // gb, n_chunks, 1) * _bc_time_major(B, dim, T, pad)).view(log_decay.shape)

    # 1. the recurrence inside every chunk at once, from a zero state (unbind: its backward is one
    #    stack, where indexing would allocate a full-size zero gradient per step)
    decay_t, drive_t = torch.exp(log_decay).unbind(0), drive.unbind(0)
    h = drive_t[0]
    local = [h]
    for t in range(1, T):
        h = torch.addcmul(drive_t[t], decay_t[t], h)  # one fused op (and one allocation) per step
        local.append(h)

    # 2. carry the end state of each chunk into the next one
    decay_since_start = torch.exp(torch.cumsum(log_decay, dim=0))  # in (0, 1]
    chunk_decay = decay_since_start[-1].unbind(2)  # decay over a whole chunk: chunks x (batch, dim, N)
    chunk_end = h.unbind(2)  # local end state of each chunk
    carry = torch.zeros((batch, dim, n), dtype=torch.float32, device=u.device)
    incoming = []
    for c in range(n_chunks):
        incoming.append(carry)
        carry = torch.addcmul(chunk_end[c], chunk_decay[c], carry)
    carry_in = torch.stack(incoming, dim=2)  # state entering each chunk: (batch, dim, chunks, N)

    # 3. every step: local state + incoming state decayed since the chunk start, read out by C
    states = torch.stack(local, dim=0) + decay_since_start * carry_in
    y = (states.view(T, batch, gc, dim // gc, n_chunks, n) * _bc_time_major(C, dim, T, pad)).sum(-1)
    y = y.view(T, batch, dim, n_chunks).permute(1, 2, 3, 0).reshape(batch, dim, n_chunks * T)[:, :, :L]
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, carry) if return_last_state else out


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    force_torch: bool = False,
) -> torch.Tensor:
    """mamba-ssm's CUDA kernel for CUDA tensors when installed, else :func:`selective_scan_torch`."""
    if u.is_cuda and _mamba_selective_scan_fn is not None and not force_torch:
        _log_once("cuda", "selective scan: mamba_ssm CUDA kernel (selective_scan_fn)")
        return _mamba_selective_scan_fn(
            u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            D=None if D is None else D.float().contiguous(), z=None if z is None else z.contiguous(),
            delta_bias=None if delta_bias is None else delta_bias.float().contiguous(), delta_softplus=delta_softplus,
        )
    if force_torch:
        why = "forced"
    elif not u.is_cuda:
        why = "tensors on CPU"
    else:
        why = "mamba_ssm not installed: MAMBA_FORCE_BUILD=TRUE pip install 'mamba-ssm>=2.2' --no-build-isolation"
    _log_once(f"torch:{why}", f"selective scan: pure-PyTorch chunked scan ({why})")
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)  # type: ignore[return-value]


def selective_scan_flops(batch: int, dim: int, length: int, d_state: int, with_d: bool = True,
                         with_z: bool = False) -> int:
    """Elementwise FLOPs of one scan, the count VMamba uses (9 per batch·dim·L·N, plus D and z):
    FLOP counters that only see matmuls and convolutions miss this work."""
    flops = 9 * batch * dim * length * d_state
    if with_d:
        flops += batch * dim * length
    if with_z:
        flops += batch * dim * length
    return flops
