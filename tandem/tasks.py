"""Background asyncio tasks that a component starts and must stop before it closes."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# How long a cancelled task has to end before it is cancelled again.
RECANCEL_S = 1.0


async def stop(task: asyncio.Task[Any] | None, recancel_s: float = RECANCEL_S) -> None:
    """Cancel `task` and wait until it has stopped; None is taken as stopped already.

    A task may lose a cancellation inside a library: a Redis store's Sentinel follower,
    cancelled in redis-py's pub/sub read, at times read on (the task "cancelling", awaiting
    the socket), and closing the store waited on it for good. So a task still running
    `recancel_s` after its cancel is cancelled again, until it ends."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=recancel_s)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()  # a fault of the task's own is raised here, as an await of it would


async def first_set(
    *events: asyncio.Event | None,
    within_s: float | None = None,
    done: asyncio.Future[Any] | None = None,
) -> None:
    """Return once any of `events` is set (None never is), `done` is done, or `within_s`
    seconds have passed."""
    waits = {asyncio.ensure_future(event.wait()) for event in events if event is not None}
    try:
        await asyncio.wait(
            waits | ({done} if done else set()),
            timeout=within_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for wait in waits:
            wait.cancel()
