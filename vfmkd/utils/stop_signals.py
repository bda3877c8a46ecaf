"""SIGINT and SIGTERM (what Slurm and Kubernetes send first): the one owner of how a tool stops.

:func:`stop_signals` (entered by every tool through ``utils.cli.run_tool``) turns both signals into
:class:`Stopped`, a ``KeyboardInterrupt``: every ``with`` and ``finally`` on the way out runs, so cache
locks are released and temp files removed. Code with safe points (the trainer's optimizer steps) runs
inside :func:`deferred`: there a first signal is only recorded; the code polls :func:`requested` at its
safe points, saves, and raises :class:`Stopped` with the line that says how to continue. A second
signal stops at once. The tool prints that line and exits 128 + the signal (130 SIGINT, 143 SIGTERM).
"""
from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from typing import Iterator, Optional

from vfmkd.utils.logging import get_logger

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending: Optional[int] = None  # the first signal received while deferring
_deferring = 0


class Stopped(KeyboardInterrupt):
    """A run stopped by ``signum``; ``outcome`` says what was saved and the command that continues."""

    def __init__(self, signum: int, outcome: str = "") -> None:
        super().__init__(signum, outcome)
        self.signum, self.outcome = int(signum), outcome

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {signal_name(self.signum)}" + (f"; {self.outcome}" if self.outcome else "")


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum: int, frame: object) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        get_logger().warning("%s received: stopping after the current step (a checkpoint is saved first; "
                             "send it again to stop at once)", signal_name(signum))
        return
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT/SIGTERM raise :class:`Stopped` inside the block (the previous handlers come back after it).
    Outside the main thread (where Python cannot install handlers) this does nothing."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in STOP_SIGNALS}
    _pending = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a first signal only sets :func:`requested`; the code stops at its next safe point."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring:
            _pending = None


def requested() -> int:
    """The signal number that asked the deferred work to stop, 0 when none did."""
    return _pending or 0


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker leaves signals to its main process (a Ctrl-C reaches the whole
    process group, Slurm signals every process); it exits with the main process either way."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def rerun_command() -> str:
    """This process's own command line (a cache tool resumes by running it again)."""
    return shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "the same command"
