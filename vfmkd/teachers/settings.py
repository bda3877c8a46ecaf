"""The settings every teacher takes, validated in one place.

A teacher's constructor keeps plain keyword arguments (the config registry checks YAML keys against
that signature); :meth:`vfmkd.teachers.base.BaseTeacher.settings_from` binds them into one
:class:`TeacherSettings` record, which is what the model is built from and what the fingerprint is
derived from, so a teacher built from some kwargs and ``config_fingerprint(**same kwargs)`` cannot
disagree.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, Optional

import torch

from vfmkd.core.device import AUTO, parse_device, resolve_device, resolve_dtype
from vfmkd.core.errors import CheckpointError, ConfigError, did_you_mean
from vfmkd.teachers.loading import computed_dtype

#: the values of ``teacher.dtype`` and what autocast runs them as
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the values of ``teacher.init``: official weights, or the explicit (loud) random-weights path
INITS = ("pretrained", "random")


#: what every teacher message calls its keys: the cache tool's ``teacher.<key>`` (see :func:`teacher_keys`)
KEY_PREFIX = "teacher"
# `teacher.<key>` as a whole word: not `Sam2Teacher.x`, `vfmkd.teachers.x` or a path
_KEY_RE = re.compile(r"(?<![\w./-])teacher\.(?=[a-z_])")


class _RenameKeys(logging.Filter):
    def __init__(self, rename: Callable[[str], str]) -> None:
        super().__init__()
        self.rename = rename

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.rename(record.getMessage()), None
        return True


@contextlib.contextmanager
def teacher_keys(prefix: str) -> Iterator[None]:
    """Inside the block, teacher messages name their keys ``<prefix>.<key>`` instead of ``teacher.<key>``:
    the ConfigError/CheckpointError raised and the log lines written (e.g. the random-init banner). A
    training run builds teacher ``sam_l`` inside ``teacher_keys("teachers.sam_l")``, so a missing file
    says ``teachers.sam_l.init=random`` where the cache tool says ``teacher.init=random``. The one place
    that maps the messages' keys to a config's key path."""
    if prefix == KEY_PREFIX:
        yield
        return
    rename = lambda text: _KEY_RE.sub(prefix + ".", text)  # noqa: E731
    log = logging.getLogger("vfmkd")
    renamer = _RenameKeys(rename)
    log.addFilter(renamer)
    try:
        yield
    except (ConfigError, CheckpointError) as err:
        if err.args and isinstance(err.args[0], str):
            err.args = (rename(err.args[0]),) + err.args[1:]
        raise
    finally:
        log.removeFilter(renamer)


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
    ``dtype``: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``, the REQUESTED compute dtype (see
    :attr:`computed_dtype`). ``device``: where the teacher runs (``auto``, ``cpu``, ``cuda``, ``cuda:1``).
    ``auto`` values are resolved when the record is made (:mod:`vfmkd.core.device`: the GPU and bf16
    where the machine has them, else the CPU and float32), so the record and the fingerprint hold
    what runs.
    ``seed``: the only source of random weights with ``init=random``. ``extra``: the family's own
    keys (e.g. LoRA-SAM's ``lora_rank``), as the constructor received them. ``variant`` is always a
    concrete size: ``auto`` is resolved by :meth:`vfmkd.teachers.base.BaseTeacher.settings_from`.
    """

    variant: str
    checkpoint: Optional[str] = None
    input_size: int = 1024
    init: str = "pretrained"
    dtype: str = AUTO
    device: str = AUTO
    seed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)
    #: how ``variant: auto`` chose :attr:`variant` (e.g. ``read from weights/x.pt``); "" when it was given
    variant_source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        check_choice("init", self.init, INITS)
        check_choice("dtype", self.dtype, (AUTO, *DTYPES))
        device = parse_device(self.device, "teacher.device")  # a malformed name fails here
        if self.device == AUTO:
            object.__setattr__(self, "device", str(device))
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, device))
        if not _is_int(self.input_size) or self.input_size <= 0:
            raise ConfigError(
                f"teacher.input_size must be a positive integer (the side of the teacher's square input in "
                f"pixels, e.g. 1024), got {self.input_size!r}."
            )
        if not _is_int(self.seed):
            raise ConfigError(f"teacher.seed must be an integer, got {self.seed!r}.")

    @property
    def computed_dtype(self) -> str:
        """The dtype the teacher actually computes in (and its fingerprint records): low precision
        only on CUDA, float32 elsewhere (:func:`vfmkd.teachers.loading.computed_dtype`)."""
        return computed_dtype(self.dtype, self.device)

    def torch_device(self) -> torch.device:
        """The device to build on; ConfigError when it is CUDA and there is none. Checked at build
        time only, not in :meth:`__post_init__`: an offline run on a CPU machine must still be able to
        fingerprint a config whose teacher ran on CUDA."""
        return resolve_device(self.device, "teacher.device")

    def autocast(self, device: torch.device) -> ContextManager[None]:
        """Autocast to the computed low-precision dtype on CUDA; a no-op for float32 and elsewhere."""
        dtype = computed_dtype(self.dtype, device)
        if torch.device(device).type == "cuda" and dtype != "float32":
            return torch.autocast(device_type="cuda", dtype=DTYPES[dtype])
        return contextlib.nullcontext()
