"""A worker's leases, renewed while it holds their jobs.

A lease runs out after `visibility_timeout_s` so that the jobs of a worker that died come back.
A live worker may hold a job longer: a batch waiting for a free lane, a slow model, a run that
gives way to the fast model. Renewing every third of the timeout keeps such a job from being
handed to a second worker, and run twice, while its first one still works on it; a worker that
dies or hangs stops renewing, and its jobs come back as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable

from tandem.errors import QueueUnavailable
from tandem.jobs.store import JobStore
from tandem.logs import counted

log = logging.getLogger("tandem.worker")


class Leases:
    """The jobs one worker holds. Each part of the worker that holds a job (its batch, then
    the storing of its answer) takes a hold and lets it go, so a job is renewed while any
    of them still needs it."""

    def __init__(self, store: JobStore, worker_id: str) -> None:
        self._store = store
        self._worker_id = worker_id
        self._holds: Counter[str] = Counter()

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._holds)

    def hold(self, job_ids: Iterable[str]) -> None:
        self._holds.update(job_ids)

    def release(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self._holds[job_id] -= 1  # one finished meanwhile goes to -1, and is dropped
            if self._holds[job_id] <= 0:
                del self._holds[job_id]

    def finished(self, job_ids: Iterable[str]) -> None:
        """These jobs' answers are stored: whatever still holds them (its webhook, say), a
        finished job has no lease to renew, and is not to be reported taken over."""
        for job_id in job_ids:
            self._holds.pop(job_id, None)

    async def keep(self) -> None:
        """Renew the leases held, every third of the visibility timeout, until cancelled."""
        every_s = self._store.policy.visibility_timeout_s / 3
        while True:
            await asyncio.sleep(every_s)
            await self.renew()

    async def renew(self) -> None:
        held = sorted(self._holds)
        if not held:
            return
        try:
            renewed = await self._store.extend(self._worker_id, held)
        except QueueUnavailable as exc:  # the next round tries again, within the timeout
            log.warning("leases of %s not renewed: %s", counted(len(held), "job"), exc)
            return
        except Exception:  # nobody awaits the keeper: said here, and the next round tries again
            log.exception("renewing the leases of %s failed", counted(len(held), "job"))
            return
        # Those still held but not renewed were taken over: this worker went longer than the
        # timeout without renewing (a stall, or the store out of reach). Whichever answer is
        # stored first stands. Those let go during the call were finished meanwhile.
        lost = [job_id for job_id in held if job_id not in renewed and job_id in self._holds]
        if lost:
            log.warning(
                "%s taken over by another worker: this one went longer than the visibility "
                "timeout without renewing the leases",
                counted(len(lost), "held job"),
            )
