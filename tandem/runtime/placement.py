"""Where a lone fast-model call's threads run: each on a CPU of its own.

Left to the scheduler, ONNX Runtime's pool thread, woken for a run after an idle moment, was
at times placed on the CPU its caller was running on, while another CPU sat idle. The
caller then spun at the end of each parallel step for a thread that could not run beside it:
on 2 cores a Lite0 run took 9 to 12 ms where it takes 4.5 (in process, a 10 to 30 ms pause
before each call). Pinning the pool's threads alone did not do: the caller, free to go
anywhere, then met them on their CPUs instead. So the pool's threads are pinned when the
session opens, and the caller to the CPU left over for the length of each run.

The caller takes the last CPU, the pool the first ones: Linux sends device interrupts to the
first CPU unless told otherwise (on the CI-class VM, the disk's and the network's all land
on CPU 0), and the store's thread, woken there by its fsync, then preempted a caller placed
there: the next request's decoding took 0.3 ms longer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

# ONNX Runtime's session option: one entry per pool thread (the caller is not in the pool).
AFFINITIES = "session.intra_op_thread_affinities"


@dataclass(frozen=True, slots=True)
class Placement:
    caller: frozenset[int]
    pool: tuple[int, ...]

    @classmethod
    def for_threads(cls, threads: int) -> Placement | None:
        """One CPU each for a run of `threads` threads, when they take every CPU this process
        may use. None otherwise: with CPUs to spare the scheduler has somewhere else to put a
        thread (and pinning to a few of many CPUs, in a container that sees the whole host,
        would pile onto whatever else runs there); one thread needs no placing."""
        cpus = sorted(os.sched_getaffinity(0))
        if not 1 < threads == len(cpus):
            return None
        return cls(frozenset(cpus[-1:]), tuple(cpus[:-1]))

    @property
    def affinities(self) -> str:
        """The pool's CPUs as ONNX Runtime's option names them: counted from 1."""
        return ";".join(str(cpu + 1) for cpu in self.pool)

    @contextlib.contextmanager
    def caller_pinned(self) -> Iterator[None]:
        """The calling thread on its CPU while inside, then back where it was allowed."""
        allowed = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, self.caller)
            pinned = True
        except OSError:  # the process may no longer use that CPU: run where the thread is
            pinned = False
        try:
            yield
        finally:
            if pinned:
                # Only a CPU taken away meanwhile fails this: the thread stays where it is,
                # and the request's answer is not lost for it.
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, allowed)
