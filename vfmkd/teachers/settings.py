"""The settings every teacher takes, validated in one place.

A teacher's constructor keeps plain keyword arguments (the config registry checks YAML keys against
that signature); :meth:`vfmkd.teachers.base.BaseTeacher.settings_from` binds them into one
:class:`TeacherSettings` record, which is what the model is built from and what the fingerprint is
derived from, so a teacher built from some kwargs and ``config_fingerprint(**same kwargs)`` cannot
disagree.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager, Dict, Iterable, Optional

import torch

from vfmkd.core.errors import ConfigError, did_you_mean
from vfmkd.teachers.loading import computed_dtype

#: the values of ``teacher.dtype`` and what autocast runs them as
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the values of ``teacher.init``: official weights, or the explicit (loud) random-weights path
INITS = ("pretrained", "random")


def check_choice(key: str, value: object, choices: Iterable[str]) -> None:
    """ConfigError naming ``teacher.<key>``, the closest valid value and all of them."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"teacher.{key}={value!r} is not valid.{did_you_mean(str(value), choices)} "
            f"Choose one of: {', '.join(choices)}."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TeacherSettings:
    """The constructor arguments every teacher family shares, checked when the record is made.

    ``variant``: the model size (``vit_b``, ``sam2.1_hiera_tiny``, ``vits14`` ...; the family checks
    it against its own list). ``checkpoint``: a weights file, ``None`` = ``weights/<official name>``.
    ``input_size``: side ``S`` of the teacher's square input ``(B, 3, S, S)`` in pixels (the family
    adds its own rule, e.g. a multiple of the patch size). ``init``: ``pretrained`` | ``random``.
    ``dtype``: ``float32`` | ``bfloat16`` | ``float16``, the REQUESTED compute dtype (see
    :attr:`computed_dtype`). ``device``: where the teacher runs (``cpu``, ``cuda``, ``cuda:1``).
    ``seed``: the only source of random weights with ``init=random``. ``extra``: the family's own
    keys (e.g. LoRA-SAM's ``lora_rank``), as the constructor received them.
    """

    variant: str
    checkpoint: Optional[str] = None
    input_size: int = 1024
    init: str = "pretrained"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("init", self.init, INITS)
        check_choice("dtype", self.dtype, DTYPES)
        if not _is_int(self.input_size) or self.input_size <= 0:
            raise ConfigError(
                f"teacher.input_size must be a positive integer (the side of the teacher's square input in "
                f"pixels, e.g. 1024), got {self.input_size!r}."
            )
        if not _is_int(self.seed):
            raise ConfigError(f"teacher.seed must be an integer, got {self.seed!r}.")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"teacher.device={self.device!r} is not a torch device ({err}); "
                              "e.g. teacher.device=cpu or teacher.device=cuda:0.") from None

    @property
    def computed_dtype(self) -> str:
        """The dtype the teacher actually computes in (and its fingerprint records): low precision
        only on CUDA, float32 elsewhere (:func:`vfmkd.teachers.loading.computed_dtype`)."""
        return computed_dtype(self.dtype, self.device)

    def torch_device(self) -> torch.device:
        """The device to build on; ConfigError when it is CUDA and there is none. Checked at build
        time only, not in :meth:`__post_init__`: an offline run on a CPU machine must still be able to
        fingerprint a config whose teacher ran on CUDA."""
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"teacher.device={self.device!r} but CUDA is not available here; set teacher.device=cpu.")
        return dev

    def autocast(self, device: torch.device) -> ContextManager[None]:
        """Autocast to the computed low-precision dtype on CUDA; a no-op for float32 and elsewhere."""
        dtype = computed_dtype(self.dtype, device)
        if torch.device(device).type == "cuda" and dtype != "float32":
            return torch.autocast(device_type="cuda", dtype=DTYPES[dtype])
        return contextlib.nullcontext()
