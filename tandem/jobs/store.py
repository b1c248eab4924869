"""The narrow interface every job store implements, and the policy they all follow.

A store is both the durable queue and the result store. Its promises, checked for every
backend by the same contract tests (tests/integration/test_store_contract.py):

- `enqueue` returns only once the job is durable; enqueueing the same id twice keeps one job.
- `claim` leases a job to one worker for `visibility_timeout_s`; a lease that runs out makes the
  job claimable again, and a job claimed `max_attempts` times without finishing is failed. A
  claim waiting for jobs ends at once when its `until` is set, leasing nothing: a worker told
  to stop does not sit out its poll.
- `extend` renews a worker's own leases: a job held longer than the timeout by a worker that is
  alive is not handed to a second one.
- `complete` and `fail` are idempotent: the first terminal write wins, later ones are ignored.
- `enqueue` refuses (QueueFull) when `max_queue_length` jobs are unfinished, and (TooManyQueued)
  a job whose owner has `max_queued_per_owner` unfinished; nothing is stored. Every owned job
  is counted, with the share off too, and finishing it, however it finishes, frees its place.
- finished jobs disappear `result_ttl_s` after they finish; queued jobs never expire.
- the fast answer may reach a job after its result: whichever of `attach_fast` and
  `complete_many` writes second reports it, so each job's agreement is counted once.
- counters are shared by every process on the store and survive restarts; each terminal write
  bumps `jobs_<status>` (and a retry `jobs_retried`) in the same atomic step as the write.
- a job whose stored record cannot be read (UnreadableJob: a newer payload version, or
  damage) or whose image is missing is failed by the claim that meets it, not handed out,
  so that one record cannot stop every worker; `get` raises UnreadableJob for the former,
  and `undelivered` leaves it out.
- `space` counts a queued image in what the store takes; its room is what it may take more
  before it refuses new jobs (tested at each backend's own limit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tandem.errors import QueueFull, TooManyQueued, UnreadableJob
from tandem.jobs.notify import Watch
from tandem.jobs.records import Claim, Delivery, Job, JobSpec
from tandem.predictions import Prediction

log = logging.getLogger("tandem.jobs")


@dataclass(frozen=True, slots=True)
class StorePolicy:
    result_ttl_s: float = 24 * 3600.0
    visibility_timeout_s: float = 60.0
    max_attempts: int = 3
    max_queue_length: int = 0  # 0: no limit
    max_queued_per_owner: int = 0  # 0: no share


@dataclass(frozen=True, slots=True)
class Completed:
    """What `complete_many` stored. `untallied`: stored jobs that came with no tally (the
    worker read them before their fast answer arrived) yet have their fast answer now, so the
    caller owes their agreement tally."""

    stored: frozenset[str]
    untallied: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int
    oldest_age_s: float


@dataclass(frozen=True, slots=True)
class StoreSpace:
    """What the store takes (`used_bytes`), and what it may take more before it refuses new
    jobs (`room_bytes`; infinite where it knows no limit)."""

    used_bytes: int
    room_bytes: float


@runtime_checkable
class JobStore(Protocol):
    policy: StorePolicy

    async def open(self) -> None:
        """Connect and create what is missing. Idempotent."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise QueueUnavailable if the backend cannot be reached, or says it takes no
        writes for now (Redis at its memory limit, or a replica)."""

    async def enqueue(self, spec: JobSpec) -> Job:
        """Store a new queued job durably and return it; an existing id, or an idempotency key
        whose job is still kept (unfinished, or finished within the TTL), returns that job
        instead. Raise QueueFull past the length limit, and TooManyQueued past its owner's
        share."""

    async def attach_fast(self, job_id: str, fast: Prediction) -> Prediction | None:
        """Add the fast answer to a job enqueued without one (it was computed meanwhile); a job
        that has one keeps it. Need not be durable: the job is, and the client has the answer.
        Returns the job's accurate result if it was stored first: then the worker could not
        judge the two answers, and the caller owes the agreement tally. A record this version
        cannot read raises UnreadableJob, and is left as it is."""

    async def get(self, job_id: str) -> Job | None:
        """The job, or None if it never existed or has expired."""

    async def claim(
        self, worker_id: str, limit: int, wait_s: float, until: asyncio.Event | None = None
    ) -> list[Claim]:
        """Lease up to `limit` jobs, waiting up to `wait_s` for the first one, or until `until`
        is set."""

    async def extend(self, worker_id: str, job_ids: Sequence[str]) -> frozenset[str]:
        """Renew for another `visibility_timeout_s` the leases `worker_id` holds on these jobs;
        returns the ids renewed. A job finished, gone, or taken over by another worker after
        this one's lease ran out is left alone."""

    async def complete(self, job_id: str, result: Prediction) -> bool:
        """Mark done with its result (cancelled, if that was asked meanwhile); False if the job
        was already finished or is gone."""

    async def complete_many(
        self,
        results: Mapping[str, Prediction],
        tallies: Mapping[str, Sequence[str]] | None = None,
    ) -> Completed:
        """`complete` for a batch, at once (one transaction or round trip). `tallies[id]` names
        counters bumped by one if, and only if, that job's result is stored, in the same atomic
        step. Of `attach_fast` and this, exactly one sees that a job has both answers."""

    async def fail(self, job_id: str, error: str, *, retry: bool) -> Job | None:
        """Record a failure; with `retry` the job is queued again while attempts remain."""

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; a running one finishes, its result marked cancelled.
        A finished job is returned unchanged; None if there is no such job."""

    async def record_delivery(self, job_id: str, delivery: Delivery) -> None:
        """Store where the job's webhook stands; nothing if the job is gone."""

    async def undelivered(self, before: float, limit: int) -> list[Job]:
        """Finished jobs with a callback URL that no worker is delivering: finished before
        `before` (Unix time) and never tried, or left `pending` since before it (the worker
        delivering it stopped). Oldest first, at most `limit`."""

    async def queue_depth(self) -> int:
        """Jobs waiting or running."""

    async def oldest_unfinished_at(self) -> float | None:
        """When the oldest job waiting or running was queued (Unix time), None if there is none.
        A job put back for a retry counts from when it was put back on Redis."""

    async def space(self) -> StoreSpace | None:
        """Its room, for the metrics; None where the backend will not say."""

    async def purge_expired(self) -> int:
        """Delete finished jobs past their TTL, and forget workers not heard from for
        WORKER_FORGOTTEN_S; returns how many jobs. A backend whose storage keeps the room that
        deleted data held (a SQLite file) starts giving it back here, in the background."""

    def watch(self, job_id: str) -> AbstractAsyncContextManager[Watch]:
        """Watch one job: `Watch.wait` returns when it may have changed. Enter before reading
        the job, so no change falls between the read and the wait."""

    @property
    def watchers(self) -> int:
        """Watches open in this process."""

    async def add_counts(self, counts: Mapping[str, int]) -> None:
        """Add to named counters."""

    async def counts(self) -> dict[str, int]:
        """Every counter's value."""

    async def beat(self, worker_id: str, model: str) -> None:
        """Record that a worker serving `model` is alive."""

    async def live_models(self, within_s: float) -> set[str]:
        """Models served by workers that beat within the last `within_s` seconds."""


# A worker not heard from for this long is forgotten by the purge: its record, and on Redis its
# consumer in the group once it holds no job. Workers that restart (deploys, autoscaling) each
# come back under a new id, and the old ones would pile up for good.
WORKER_FORGOTTEN_S = 3600.0

# The error of a job whose image a claim cannot find (a damaged store): failed, not handed out.
MISSING_IMAGE = "the job's image is missing from the store"


def unreadable_failure(exc: UnreadableJob) -> str:
    """The error stored on a job that a claim could not read, which fails it; logged, since
    it points at a mixed-version deployment or a damaged store."""
    log.error("%s; the job is failed rather than handed to a worker", exc.message)
    return f"the job's stored record could not be read: {exc.reason}"


def queue_full(limit: int) -> QueueFull:
    return QueueFull(f"the queue holds {limit} jobs, its limit", limit=limit)


def owner_share_full(share: int) -> TooManyQueued:
    return TooManyQueued(
        f"this API key's client has {share} jobs waiting or running, its share of the queue",
        limit=share,
    )
