"""torch.distributed for training: one process per device, started by ``torchrun``.

``torchrun --nproc_per_node N tools/train.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous) in each process's environment; :func:`init_distributed` joins the group (NCCL on CUDA,
gloo on CPU). Without those variables a run is a single process and every helper is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from vfmkd.core.device import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """``rank`` of ``world_size`` processes; ``device`` is this process's device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, TensorBoard, checkpoints, metrics and pictures."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def max_int(self, value: int) -> int:
        """The largest ``value`` over every rank (e.g. the signal any rank received), the same on each."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sum_logs(self, sums: Dict[str, float], counts: Dict[str, int]) -> Dict[str, float]:
        """Epoch means of per-step logs over every rank's steps (same keys on every rank)."""
        keys = sorted(sums)
        if self.enabled and keys:
            t = torch.tensor([[sums[k], float(counts[k])] for k in keys], dtype=torch.float64, device=self._comm_device)
            dist.all_reduce(t)
            sums = {k: float(t[i, 0]) for i, k in enumerate(keys)}
            counts = {k: int(t[i, 1]) for i, k in enumerate(keys)}
        return {k: sums[k] / counts[k] for k in keys}

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (small picklable objects: a run directory path)."""
        if not self.enabled:
            return value
        box: List[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device_name: str, key: str = "train.device",
                     timeout: Optional[timedelta] = None) -> DistributedContext:
    """Join the process group torchrun describes (RANK set, WORLD_SIZE > 1) or run alone; the device of
    this rank (``auto`` under torchrun: cuda:LOCAL_RANK). ``key`` names the setting in errors; ``timeout``
    bounds each collective (None: torch's default). The one entry for training and the cache tool."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    requested = resolve_device(device_name, key)
    if "RANK" not in os.environ or world <= 1:
        return DistributedContext(device=requested)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = requested.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", **({"timeout": timeout} if timeout else {}))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def leave_distributed() -> None:
    """Leave the process group this process joined (no-op when it joined none). Called when a command ends,
    however it ends: a gloo group left to the interpreter's teardown can abort the process
    ("terminate called without an active exception") while its threads are still joinable."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

