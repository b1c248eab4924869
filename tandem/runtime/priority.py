"""The fast path first: how fast-model calls and the embedded worker share one machine's cores."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import onnxruntime as ort

R = TypeVar("R")


class Preempted(Exception):
    """An ONNX Runtime run stopped because a fast-model call started (see Occupancy)."""


class Occupancy:
    """Fast-model calls running now. A call checks whether it is alone (then it may use every
    core: on 2 cores a batch-1 Lite0 run takes 5.4 ms on two threads against 9.9 ms on one).
    The embedded worker waits for a quiet moment, and its runs stop when a call starts."""

    def __init__(self) -> None:
        self._running = 0
        self._idle_since = time.monotonic()
        self._changed = threading.Condition()
        self._preemptible: list[ort.RunOptions] = []

    def busy(self) -> bool:
        """Whether a fast-model call is running now."""
        return self._running > 0

    @contextlib.contextmanager
    def held(self) -> Iterator[Callable[[], bool]]:
        """Count this call while inside; yields a check: is it alone right now?"""
        with self._changed:
            self._running += 1
            for options in self._preemptible:
                options.terminate = True
        try:
            yield lambda: self._running == 1
        finally:
            with self._changed:
                self._running -= 1
                if self._running == 0:
                    self._idle_since = time.monotonic()
                    self._changed.notify_all()

    def wait_quiet(self, quiet_s: float, timeout_s: float) -> bool:
        """Block until no call has run for `quiet_s`; False if `timeout_s` ran out first."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                now = time.monotonic()
                if self._running == 0 and now - self._idle_since >= quiet_s:
                    return True
                if now >= deadline:
                    return False
                until = deadline if self._running else min(deadline, self._idle_since + quiet_s)
                self._changed.wait(until - now)

    @contextlib.contextmanager
    def preemptible(self) -> Iterator[ort.RunOptions]:
        """Run options that a call starting while inside terminates; already terminated if
        one started since the last `wait_quiet`, so no call is missed in between."""
        options = ort.RunOptions()
        with self._changed:
            options.terminate = self._running > 0
            self._preemptible.append(options)
        try:
            yield options
        finally:
            with self._changed:
                self._preemptible.remove(options)


@dataclass(frozen=True, slots=True)
class GiveWay:
    """The embedded worker's manners: each step waits until the fast path has been quiet for
    `quiet_s` (a gap shorter than a client's turnaround between requests is not idle time),
    and a run that a fast call interrupts is retried at the next quiet moment. After
    `patience_s` of giving way a step runs anyway, beside the fast path, so that a steady
    stream of requests slows the accurate model down but never stops it."""

    calls: Occupancy
    quiet_s: float = 0.005
    patience_s: float = 2.0

    def wait(self) -> None:
        """For a step that cannot be interrupted: wait for quiet, at most `patience_s`."""
        self.calls.wait_quiet(self.quiet_s, self.patience_s)

    def run(self, step: Callable[[ort.RunOptions | None], R]) -> R:
        """`step(options)` at a quiet moment, again if a fast call preempts it, and
        `step(None)`, not to be preempted, once `patience_s` has passed."""
        deadline = time.monotonic() + self.patience_s
        while self.calls.wait_quiet(self.quiet_s, deadline - time.monotonic()):
            with self.calls.preemptible() as options:
                try:
                    return step(options)
                except Preempted:
                    continue
        return step(None)
