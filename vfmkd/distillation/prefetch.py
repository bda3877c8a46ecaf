"""The prefetching live teacher: the live targets of the coming batches are computed while the student
steps on the current one.

The router decides every batch's routes ahead (:meth:`TeacherRouter.plan` is a pure function of the
step, the batch and its cached targets), so the live passes of the next ``depth`` batches can start
early: on CUDA on a side stream, on a CPU in one background thread with its own thread budget
(``torch.set_num_threads`` is per thread: the teacher's thread gets ``teacher_threads``, the student's
thread the rest of the process's threads). What is computed is unchanged: the same batches in the same order
(the loader is only read further ahead; augmentation draws are per (seed, epoch, index)), the same
routes (counted when the student takes the batch, so a run stopped mid-epoch counts what it trained),
the same live passes (a teacher pass draws no random numbers). Only the thread split may move float
sums in their last bits, as any change of ``torch.set_num_threads`` does.
"""
from __future__ import annotations

import collections
import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch

from vfmkd.core.errors import ConfigError
from vfmkd.datasets.records import Batch
from vfmkd.distillation.routing import Route, TeacherRouter
from vfmkd.distillation.targets import TeacherTargets

PREFETCH_MODES = ("auto", "on", "off")
#: the teachers a step distils: one list for the epoch, or step -> list (teacher dropping draws per step)
StepTeachers = Union[List[str], Callable[[int], List[str]]]


@dataclass
class PreparedBatch:
    """One training batch as the step takes it: ``batch`` on the training device, its ``step`` number and
    ``targets`` per teacher (empty on steps that do not distil)."""

    batch: Batch
    step: int
    targets: Dict[str, TeacherTargets]


@dataclass
class _Pending:
    batch: Batch
    step: int
    cached: Dict[str, TeacherTargets]
    routes: List[Tuple[str, Route]]
    live: Dict[str, Future]  # teacher -> (targets, CUDA done-event or None)


def split_threads(total: int, teacher_threads: int) -> Tuple[int, int]:
    """(teacher, student) threads out of ``total`` (the process's torch threads): ``teacher_threads`` (0 = auto:
    half, at least one), the student the rest (at least one)."""
    teacher = teacher_threads or max(1, total // 2)
    return teacher, max(1, total - teacher)


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``obj`` (dataclasses, dicts, lists, tuples, nested): targets for ``record_stream``."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif is_dataclass(obj):
        for f in fields(obj):
            yield from tensors_in(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


class TargetPrefetcher:
    """Feeds a training epoch: ``epoch(items, first_step, interval, teachers)`` yields a
    :class:`PreparedBatch` per loader item (:class:`DistillBatch`), in the loader's order.

    ``mode``: ``on`` overlaps the live passes with the student whenever a live model is loaded (a side
    stream on CUDA, a teacher thread on the CPU); ``auto`` does so on CUDA only — on a 2-core CPU the teacher
    thread competing with the student measured 0.63x the serial throughput (BENCHMARKS.md, issue 21);
    ``off``: every live pass runs when its step starts, the serial path. ``depth``: how many
    batches ahead the teacher may run (in a mixed run the live batches are rare: looking further
    ahead lets the teacher work through the student's offline steps); ``teacher_threads``: the
    teacher thread's CPU thread budget (0 = half of the process's torch threads)."""

    def __init__(self, router: TeacherRouter, device: torch.device, mode: str = "auto", depth: int = 2,
                 teacher_threads: int = 0) -> None:
        # YAML reads a bare `off` as false (and `on` as true): both spellings mean the same here
        mode = {"false": "off", "true": "on"}.get(str(mode).lower(), str(mode))
        if mode not in PREFETCH_MODES:
            raise ConfigError(f"train.teacher_prefetch={mode!r} is not valid; choose one of: "
                              f"{', '.join(PREFETCH_MODES)}.")
        if int(depth) < 1:
            raise ConfigError(f"train.teacher_prefetch_depth must be >= 1 (batches the teacher runs ahead), "
                              f"got {depth}.")
        if int(teacher_threads) < 0:
            raise ConfigError(f"train.teacher_threads must be >= 0 (0 = half the threads), got {teacher_threads}.")
        self.router, self.device = router, torch.device(device)
        self.mode, self.depth, self.teacher_threads = mode, int(depth), int(teacher_threads)

    @property
    def overlaps(self) -> bool:
        """Live passes run ahead of the student: prefetching is on and some live model is loaded."""
        wanted = self.mode == "on" or (self.mode == "auto" and self.device.type == "cuda")
        return wanted and any(s.live is not None for s in self.router.sources.values())

    def epoch(self, items: Iterable[Any], first_step: int, interval: int,
              teachers: StepTeachers) -> Iterator[PreparedBatch]:
        """The epoch's batches (``items`` of steps first_step, first_step + 1, ...) with their targets; close
        the generator (:func:`prepared_epoch`) when the loop may end early: pending passes are finished and
        the thread budget restored."""
        if not self.overlaps:
            for step, item in enumerate(items, start=first_step):
                batch = item.batch.to(self.device)
                targets = (self.router.targets(step, batch, item.cached, _of_step(teachers, step))
                           if step % interval == 0 else {})
                yield PreparedBatch(batch, step, targets)
            return
        yield from self._overlapped(iter(items), first_step, interval, teachers)

    def _overlapped(self, items: Iterator[Any], step: int, interval: int,
                    teachers: StepTeachers) -> Iterator[PreparedBatch]:
        cuda = self.device.type == "cuda"
        student_before = torch.get_num_threads()
        teacher_n, student_n = split_threads(student_before, self.teacher_threads)
        side = torch.cuda.Stream(self.device) if cuda else None

        def budget() -> None:
            torch.get_num_threads()  # ATen sets a new thread's budget lazily from the global one: first
            torch.set_num_threads(teacher_n)  # then this thread's own

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vfmkd-teacher", initializer=budget)
        window: Deque[_Pending] = collections.deque()
        try:
            pool.submit(lambda: None).result()  # the budget is set before the student's is lowered
            if not cuda:
                torch.set_num_threads(student_n)
            ahead = step  # the step of the next batch read from the loader
            while True:
                current = window.popleft() if window else None
                while len(window) < self.depth:  # keep `depth` batches queued while the student takes this one
                    item = next(items, None)
                    if item is None:
                        break
                    window.append(self._submit(pool, side, item, ahead, interval, teachers))
                    ahead += 1
                if current is None:
                    if not window:
                        return
                    continue  # the first turn: the window was empty
                yield self._take(current)
        finally:
            for pending in window:
                for fut in pending.live.values():
                    fut.cancel()
            pool.shutdown(wait=True)
            torch.set_num_threads(student_before)

    def _submit(self, pool: ThreadPoolExecutor, side: Optional[Any], item: Any, step: int, interval: int,
                teachers: StepTeachers) -> _Pending:
        """Route the batch of ``step`` now and queue its live passes on the teacher's thread."""
        batch = item.batch.to(self.device)
        routes = self.router.plan(step, batch, item.cached, _of_step(teachers, step)) if step % interval == 0 else []
        ready = torch.cuda.current_stream(self.device).record_event() if side is not None else None
        live = {}
        for name, route in routes:
            if route.mode == "online":
                model = self.router.live_model(name, route)
                live[name] = pool.submit(self._live_pass, model, batch, side, ready)
        return _Pending(batch, step, item.cached, routes, live)

    @staticmethod
    def _live_pass(model: Any, batch: Batch, side: Optional[Any], ready: Optional[Any]) -> Tuple[TeacherTargets, Any]:
        """(targets, the CUDA event that marks them done; None on a CPU)."""
        if side is None:
            return model.targets(batch), None
        with torch.cuda.stream(side):
            side.wait_event(ready)  # the batch's copy to the device (and the steps queued before) are done
            targets = model.targets(batch)
            return targets, side.record_event()

    def _take(self, pending: _Pending) -> PreparedBatch:
        """The student's turn on this batch: count its routes and gather its targets (waiting for live ones)."""
        out: Dict[str, TeacherTargets] = {}
        for name, route in pending.routes:
            self.router.count(name, route)
            if route.mode == "offline":
                out[name] = pending.cached[name]
            elif route.mode == "online":
                out[name] = self._ready(*pending.live[name].result())
        return PreparedBatch(pending.batch, pending.step, out)

    def _ready(self, targets: TeacherTargets, done: Optional[Any]) -> TeacherTargets:
        if done is None:
            return targets
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        for t in tensors_in(targets):
            if t.device.type == "cuda":
                t.record_stream(stream)  # made on the side stream, used (and freed) on this one
        return targets


def _of_step(teachers: StepTeachers, step: int) -> List[str]:
    """The teachers of ``step``: a list, or step -> list (teacher dropping, vfmkd/distillation/teacher_drop.py)."""
    return teachers(step) if callable(teachers) else teachers


@contextlib.contextmanager
def prepared_epoch(prefetcher: TargetPrefetcher, items: Iterable[Any], first_step: int, interval: int,
                   teachers: StepTeachers) -> Iterator[Iterator[PreparedBatch]]:
    """:meth:`TargetPrefetcher.epoch` closed on leaving the block (a stop or an error mid-epoch included)."""
    gen = prefetcher.epoch(items, first_step, interval, teachers)
    try:
        yield gen
    finally:
        gen.close()
