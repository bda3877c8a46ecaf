"""What every teacher does with its weights: find the official file, load it safely, check that it
is the configured variant, or take the explicit random-init path loudly. One place, so SAM, SAM2,
DINO and any new teacher give the same messages and the same fingerprints."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from vfmkd.core.errors import CheckpointError
from vfmkd.core.official_weights import OFFICIAL_WEIGHTS, default_checkpoint_path, weights_for
from vfmkd.utils.checkpoint import load_checkpoint, sha256_of_file, unwrap_state_dict

logger = logging.getLogger("vfmkd")

RANDOM_BANNER = """
################################################################################
##  {label} TEACHER IS RANDOMLY INITIALISED (teacher.init=random): NO PRETRAINED WEIGHTS.
##  Its features are MEANINGLESS for real distillation: a student trained on them
##  learns nothing useful. Use this only for smoke tests and offline demos.
##  For real runs: {download}
##  and set teacher.init=pretrained.
################################################################################"""


def checkpoint_path(family: str, variant: str, checkpoint: Optional[str]) -> Path:
    """The configured file, or ``weights/<official filename>`` of this variant."""
    return Path(checkpoint) if checkpoint else default_checkpoint_path(weights_for(family, variant).name)


#: a function naming the variant of a state_dict from its tensors (CheckpointError when it cannot)
Detect = Callable[[Mapping[str, torch.Tensor], str], str]
_DETECTED: Dict[Tuple[str, str, int, int], str] = {}


def auto_variant(family: str, default: str, checkpoint: Optional[str], init: str,
                 detect: Detect) -> Tuple[str, str, Optional[str]]:
    """``(variant, how it was chosen, the file read)`` for ``variant: auto``: the size of the weights
    file the build would load (``checkpoint``, else the default size's official file, which the build
    must then load whatever size it holds), read from its tensors by ``detect``; the family's
    ``default`` size when there is no file to read (``init=random`` without a checkpoint, or a missing
    file: the build then says how to download the default size). The tensors are memory-mapped, not
    read, and the answer is remembered per file version."""
    if init == "random" and not checkpoint:
        return default, "the default size (teacher.init=random, no checkpoint)", None
    path = checkpoint_path(family, default, checkpoint)
    if not path.is_file():
        return default, f"the default size ({path} is not on this machine)", None
    st = path.stat()
    key = (family, str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DETECTED:
        hint = weights_for(family, default).download_command
        state_dict = unwrap_state_dict(load_checkpoint(path, download_hint=hint, mmap=True))
        _DETECTED[key] = detect(state_dict, f"checkpoint {path}")
    return _DETECTED[key], f"read from {path}", str(path)


def load_teacher_weights(
    label: str,
    family: str,
    variant: str,
    checkpoint: Optional[str],
    init: str,
    seed: int,
    check: Callable[[Dict[str, torch.Tensor], Path], None],
) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """``(state_dict, weights id)``: the checked official state dict and its sha256, or ``(None,
    "random-init:seed<N>")`` when the user asked for random weights (logged with a banner).
    ``check(state_dict, path)`` raises CheckpointError when the file is another variant; it runs
    before any model is built, so a wrong file fails in milliseconds."""
    # A teacher of your own has no entry in the official table: it names its file with teacher.checkpoint.
    official = weights_for(family, variant) if (family, variant) in _official_pairs() else None
    download = official.download_command if official else f"set teacher.checkpoint to your {label} weights file"
    if init == "random":
        if checkpoint:
            logger.warning("teacher.checkpoint=%s is ignored because teacher.init=random.", checkpoint)
        logger.warning(RANDOM_BANNER.format(label=label, download=download))
        return None, f"random-init:seed{seed}"
    path = checkpoint_path(family, variant, checkpoint)
    if not path.exists():
        fix = "Set teacher.checkpoint to an existing file."
        if official:
            fix = f"Download it with `{download}`, or set teacher.checkpoint=/path/to/{official.filename}."
        raise CheckpointError(
            f"{label} {variant} checkpoint not found: {path} (absolute: {path.resolve()}). {fix} "
            "For a smoke test without weights set teacher.init=random explicitly "
            "(features are then meaningless)."
        )
    state_dict = unwrap_state_dict(load_checkpoint(path, download_hint=download))
    check(state_dict, path)
    return state_dict, sha256_of_file(path)


def _official_pairs() -> set[Tuple[str, str]]:
    return {(w.family, w.variant) for w in OFFICIAL_WEIGHTS.values()}


def config_weights_id(family: str, variant: str, checkpoint: Optional[str], init: str, seed: int) -> str:
    """The weights id :func:`load_teacher_weights` would give, without loading (``unknown (...)``
    when the checkpoint is not on this machine)."""
    if init == "random":
        return f"random-init:seed{seed}"
    path = checkpoint_path(family, variant, checkpoint)
    return sha256_of_file(path) if path.is_file() else f"unknown (checkpoint {path} is not on this machine)"


def computed_dtype(dtype: str, device: str | torch.device) -> str:
    """Low precision only runs on CUDA (autocast); elsewhere the teacher computes in float32."""
    return dtype if torch.device(device).type == "cuda" else "float32"


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build random weights from ``seed`` alone (the global RNG is left untouched), so the cache tool
    and a later live pass of the same config hold the same random teacher."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
