"""Change notification: "job X changed" fanned out to whoever in this process watches X.

Each store feeds its hub from where its writes become visible: the SQLite store after its own
commits (and, for other processes', when the file's data_version moves), the Redis store from
one pub/sub subscription per process. Watchers then re-read the
job, so a notification carries no state and a spurious one costs one read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tandem.tasks import first_set


class Watch:
    """One watcher of one job."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        """Make the current or next `wait` return at once."""
        self._event.set()

    async def wait(self, timeout: float) -> None:  # noqa: ASYNC109 (waking early is the point)
        """Return when the job may have changed, or after `timeout`."""
        await first_set(self._event, within_s=timeout)
        self._event.clear()


class Hub:
    def __init__(self) -> None:
        self._watches: dict[str, set[Watch]] = {}

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[Watch]:
        watch = Watch()
        self._watches.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            watchers = self._watches.get(job_id)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._watches[job_id]

    def notify(self, job_id: str) -> None:
        for watch in self._watches.get(job_id, ()):
            watch.wake()

    def notify_all(self) -> None:
        """After a gap in the feed (a reconnect), or a write the store cannot place (another
        process's, on SQLite), anything may have changed."""
        for watchers in self._watches.values():
            for watch in watchers:
                watch.wake()

    @property
    def watchers(self) -> int:
        return sum(len(w) for w in self._watches.values())
