"""Stopping model runs from another thread once nobody waits for them: a request or a worker's
batch past its deadline."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import onnxruntime as ort

from tandem.runtime.priority import Preempted


class Aborted(Exception):
    """A run stopped, or was not started, because its request or batch was aborted."""


class RunAbort:
    """The runs of one request or batch. A thread cannot be stopped, but an ONNX Runtime run
    can: `abort` terminates the runs in progress at their next step and refuses later ones,
    so a pool thread or a worker's lane gets back to work instead of finishing a run whose
    answer nobody waits for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[ort.RunOptions] = []
        self._aborted = False

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            for options in self._runs:
                options.terminate = True

    @contextlib.contextmanager
    def watching(self, options: ort.RunOptions | None = None) -> Iterator[ort.RunOptions]:
        """Run options for one run (`options`, when another party may also stop it); the run
        raises Aborted once `abort` is called."""
        if options is None:
            options = ort.RunOptions()
        with self._lock:
            if self._aborted:
                raise Aborted
            self._runs.append(options)
        try:
            yield options
        except Preempted:
            if self._aborted:  # not a fast call's preemption: no retry
                raise Aborted from None
            raise
        finally:
            with self._lock:
                self._runs.remove(options)
