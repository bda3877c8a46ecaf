"""Where a run computes and in which precision: the one owner of ``device: auto``, ``dtype: auto``
and ``train.amp: auto`` (teachers, the student, the cache tool and torchrun all ask here).

* ``device: auto`` -> ``cuda:LOCAL_RANK`` under torchrun (``LOCAL_RANK`` set), else ``cuda`` when a
  GPU is visible, else ``cpu``. A plain ``cuda`` under torchrun is also this rank's GPU.
* ``dtype: auto`` (teachers) -> ``bfloat16`` on a GPU that supports it, else ``float32``.
* ``amp: auto`` (the student) -> bf16 autocast on a GPU that supports it, off elsewhere.

So a CPU machine runs exactly as with ``cpu`` / ``float32`` / ``amp: false``.
"""
from __future__ import annotations

import logging
import os
from typing import Set, Tuple, Union

import torch

from vfmkd.core.errors import ConfigError

AUTO = "auto"
DeviceLike = Union[str, torch.device]

logger = logging.getLogger("vfmkd")
_LOGGED: Set[Tuple[str, str]] = set()


def _local_rank() -> Union[int, None]:
    """torchrun's ``LOCAL_RANK`` (None when not started by torchrun)."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def parse_device(name: DeviceLike, key: str = "device") -> torch.device:
    """``name`` as a torch device, ``auto`` resolved; an explicit CUDA device is NOT checked against
    this machine (an offline run may fingerprint a config whose teacher ran on a GPU): see
    :func:`resolve_device` for the checked form. ConfigError naming ``key`` for a malformed name."""
    text = str(name).strip()
    local = _local_rank()
    if text == AUTO:
        if not torch.cuda.is_available():
            dev = torch.device("cpu")
        else:
            dev = torch.device("cuda", local) if local is not None else torch.device("cuda")
        _log_once(key, dev, local)
        return dev
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"{key}={name!r} is not a torch device ({err}); use {key}=auto (the GPU when there "
                          f"is one), {key}=cpu, {key}=cuda or {key}=cuda:N.") from None
    if dev.type == "cuda" and dev.index is None and local is not None:
        dev = torch.device("cuda", local)  # under torchrun a plain `cuda` is this rank's GPU
    return dev


def resolve_device(name: DeviceLike, key: str = "device") -> torch.device:
    """:func:`parse_device`, then a one-line ConfigError when it names a GPU this machine lacks."""
    dev = parse_device(name, key)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available on this machine; set {key}=auto (the GPU "
                              f"when there is one, else the CPU) or {key}=cpu.")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{key}={name} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                              f"set {key}=auto or a device that exists.")
    return dev


def bf16_gpu(device: DeviceLike) -> bool:
    """``device`` is a CUDA device of this machine that computes in bfloat16 natively."""
    return (torch.device(device).type == "cuda" and torch.cuda.is_available()
            and bool(torch.cuda.is_bf16_supported(including_emulation=False)))


def resolve_dtype(dtype: str, device: DeviceLike) -> str:
    """A teacher's ``dtype``: ``auto`` -> ``bfloat16`` on a bf16-capable GPU, else ``float32``;
    any other value is returned as given (the caller checks it)."""
    if dtype != AUTO:
        return dtype
    return "bfloat16" if bf16_gpu(device) else "float32"


def resolve_amp(amp: object, device: DeviceLike, key: str = "train.amp") -> bool:
    """The student's bf16 autocast: ``auto`` -> on a bf16-capable GPU, off elsewhere; true/false as given."""
    if isinstance(amp, bool):
        return amp
    if amp == AUTO:
        return bf16_gpu(device)
    raise ConfigError(f"{key} must be auto, true or false, got {amp!r}.")


def _log_once(key: str, dev: torch.device, local: Union[int, None]) -> None:
    """Say once per process what ``auto`` became for ``key`` and why."""
    if (key, str(dev)) in _LOGGED:
        return
    _LOGGED.add((key, str(dev)))
    why = (f"torchrun LOCAL_RANK={local}" if dev.type == "cuda" and local is not None
           else "a CUDA GPU is visible" if dev.type == "cuda" else "no CUDA GPU visible")
    logger.info("%s: auto -> %s (%s)", key, dev, why)
