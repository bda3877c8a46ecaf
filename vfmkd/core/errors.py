"""Exceptions whose messages tell the user what to change."""
from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, unsafe or belongs to another model."""


class CacheMismatchError(RuntimeError):
    """Cached teacher features were produced by another teacher, input size or dataset."""


class DatasetError(ValueError):
    """A dataset file (image or label) cannot be used as it is."""


class NonFiniteLossError(FloatingPointError):
    """A loss (or the weighted total) became NaN/inf; the message names the term and the fix."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the closest choice, or "" when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""
