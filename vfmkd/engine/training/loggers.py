"""Where a run's scalars and pictures go: TensorBoard always available, Weights & Biases optional.

``train.loggers: [tensorboard, wandb]``. wandb is not a dependency of vfmkd: it is imported only
when asked for, and a run that asks for it without the package stops before training with a
:class:`ConfigError` saying ``pip install wandb`` (or remove it from ``train.loggers``).
``WANDB_MODE=offline`` works without network or account: wandb writes the run under
``<run_dir>/wandb/`` and ``wandb sync <that folder>`` uploads it later. ``WANDB_PROJECT`` /
``WANDB_ENTITY`` and the other ``WANDB_*`` variables are honoured by wandb itself.

wandb needs one increasing step per chart while vfmkd logs ``train/*`` per batch and ``val/*`` per
epoch, so each tag prefix gets its own step metric (``train/step``, ``val/step``, ...), declared with
``wandb.define_metric``; TensorBoard gets the step directly.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Set, Union

import numpy as np

from vfmkd.core.errors import ConfigError, did_you_mean

VALID_LOGGERS = ("tensorboard", "wandb")
WANDB_MISSING = ("train.loggers includes 'wandb' but the wandb package is not installed: `pip install wandb` "
                 "(WANDB_MODE=offline works without network) or remove 'wandb' from train.loggers")


def check_loggers(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for an unknown logger name, or for ``wandb`` without the package.
    Cheap (does not import wandb when it is not asked for): call it when validating a config."""
    for name in names:
        if name not in VALID_LOGGERS:
            raise ConfigError(f"train.loggers: unknown logger '{name}'; valid: {', '.join(VALID_LOGGERS)}."
                              + did_you_mean(name, VALID_LOGGERS))
    if "wandb" in names and not _wandb_installed():
        raise ConfigError(WANDB_MISSING)


def _wandb_installed() -> bool:
    try:
        return importlib.util.find_spec("wandb") is not None
    except ValueError:  # imported already, without a module spec
        return True


def _image_array(image: Union[str, Path, np.ndarray]) -> np.ndarray:
    """A PNG path or an (H, W, 3|4) uint8 array -> (H, W, 3) uint8."""
    if isinstance(image, (str, Path)):
        from vfmkd.datasets.image_files import load_rgb  # the one image decoder (16-bit scaling, EXIF)

        return load_rgb(image)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise ValueError(f"add_image takes a PNG path or an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return arr[..., :3]


class RunLoggers:
    """The loggers of one run (create on the main rank only).

    ``run_dir``: TensorBoard event files go there (as before), wandb's offline files under
    ``run_dir/wandb``. ``loggers``: names from :data:`VALID_LOGGERS`. ``project`` / ``config``:
    the wandb project and the run's resolved config (a plain dict), ``name`` the wandb run name
    (default: the run folder's name). Also a context manager (closes on exit).
    """

    def __init__(self, run_dir: Union[str, Path], loggers: Sequence[str] = ("tensorboard",), project: str = "vfmkd",
                 config: Optional[Mapping[str, Any]] = None, name: Optional[str] = None) -> None:
        names = list(dict.fromkeys(loggers))
        check_loggers(names)
        self.run_dir = Path(run_dir)
        self.names = names
        self.tb: Any = None
        self.wandb: Any = None  # the wandb module, when logging to it
        self.wandb_run: Any = None
        self._prefixes: Set[str] = set()
        if "wandb" in names:  # first: a failing wandb.init leaves no half-made TensorBoard run behind
            try:
                wandb = importlib.import_module("wandb")
            except ImportError as exc:
                raise ConfigError(f"{WANDB_MISSING} ({exc})") from None
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(project=project, name=name or self.run_dir.name, dir=str(self.run_dir),
                                        config=dict(config or {}))
            self.wandb = wandb
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir))

    def _wandb_step(self, tag: str, step: int) -> Dict[str, Any]:
        """The step field of ``tag``'s chart: ``<prefix>/step`` (``step`` for a tag without a prefix)."""
        prefix = tag.split("/", 1)[0] if "/" in tag else ""
        step_key = f"{prefix}/step" if prefix else "step"
        pattern = f"{prefix}/*" if prefix else tag
        if pattern not in self._prefixes:
            self._prefixes.add(pattern)
            self.wandb.define_metric(step_key)
            self.wandb.define_metric(pattern, step_metric=step_key)
        return {step_key: int(step)}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        value = float(value)
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value, **self._wandb_step(tag, step)})

    def add_scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        """``add_scalar(prefix + k, v, step)`` for each item."""
        for k, v in values.items():
            self.add_scalar(f"{prefix}{k}", v, step)

    def add_image(self, tag: str, image: Union[str, Path, np.ndarray], step: int) -> None:
        """A PNG file (e.g. what :func:`vfmkd.engine.pictures.prediction_panel.render_panel` wrote) or an
        (H, W, 3) uint8 array."""
        arr = _image_array(image)
        if self.tb is not None:
            self.tb.add_image(tag, arr, step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.log({tag: self.wandb.Image(arr), **self._wandb_step(tag, step)})

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = self.wandb_run = None

    def __enter__(self) -> RunLoggers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
