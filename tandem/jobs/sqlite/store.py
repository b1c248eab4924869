"""The SQLite JobStore: the jobs' life, from enqueue to purge, in one file.

sqlite3 blocks, so every call runs on one dedicated thread that owns the connection; that also
serialises this process's writes. Other processes on the same file are kept apart by SQLite's
own locking (`BEGIN IMMEDIATE` and a busy timeout). What keeps the file within bounds, its WAL
and its free pages, is in `upkeep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TypeVar

from tandem.errors import (
    DiskLow,
    QueueUnavailable,
    UnreadableJob,
)
from tandem.files import private_dir, private_file
from tandem.jobs.notify import Hub, Watch
from tandem.jobs.records import (
    STORED_FIELDS,
    TERMINAL_STATUSES,
    Claim,
    Delivery,
    DeliveryState,
    Job,
    JobSpec,
    JobStatus,
    dump_delivery,
    dump_meta,
    dump_prediction,
    job_from_stored,
    load_meta,
    load_prediction,
    meta_with_fast,
)
from tandem.jobs.sqlite import schema, upkeep
from tandem.jobs.sqlite.schema import check_database, in_transaction
from tandem.jobs.store import (
    MISSING_IMAGE,
    WORKER_FORGOTTEN_S,
    Completed,
    StorePolicy,
    StoreSpace,
    owner_share_full,
    queue_full,
    unreadable_failure,
)
from tandem.outage import Outage
from tandem.predictions import Prediction
from tandem.tasks import first_set, stop

T = TypeVar("T")
log = logging.getLogger("tandem.jobs")

_JOB_COLUMNS = (
    "id, status, created_at, updated_at, attempts, meta, result, error, finished_at,"
    " cancel_requested, webhook, owner"
)
_LOST = "the worker running this job stopped {n} times before finishing it"
RECHECK_S = 0.5


class SQLiteJobStore:
    """JobStore on a local SQLite file."""

    def __init__(
        self,
        path: Path,
        policy: StorePolicy | None = None,
        clock: Callable[[], float] = time.time,
        min_free_bytes: int = 0,
    ) -> None:
        self.path = path
        self.policy = policy or StorePolicy()
        self._clock = clock
        # Kept free for the workers: finishing a job writes before it frees the image's pages,
        # and a checkpoint grows the file, so a disk filled by new jobs would hold them all.
        self.min_free_bytes = min_free_bytes
        # Room the last job that met a full disk needs (its image in the WAL, then in the
        # file), kept as a floor until there is that room: the ping's small write went on
        # passing on that disk, and /health/all said ok while every new job was refused.
        self._refused_bytes = 0
        self._conn: sqlite3.Connection | None = None
        self._shrinks = False
        self._giving_back: asyncio.Task[None] | None = None
        self._closed = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-sqlite")
        # Wakes an in-process worker as soon as a job is enqueued instead of at its next poll.
        self._enqueued = asyncio.Event()
        # Watchers hear of this process's writes at once; other processes' within RECHECK_S.
        self._hub = Hub()
        self._others = _OtherWriters(lambda: self._run(_data_version), self._hub)
        self._checkpointer = upkeep.Checkpointer(path, upkeep.CHECKPOINT_EVERY_S, self._run)

    def watch(self, job_id: str) -> AbstractAsyncContextManager[Watch]:
        return self._hub.watch(job_id)

    @property
    def watchers(self) -> int:
        return self._hub.watchers

    def _changed(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self._hub.notify(job_id)

    # -- plumbing ------------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, lazy: bool = False) -> T:
        """Run on the store's thread and connection; with `lazy`, its commit skips the fsync
        (for writes a crash may lose): it reaches the disk with the next durable commit or
        checkpoint."""

        def call() -> T:
            conn = self._conn
            if conn is None:
                raise QueueUnavailable("the job store is closed")
            try:
                if not lazy:
                    return fn(conn)
                with upkeep.lazily(conn):
                    return fn(conn)
            except sqlite3.OperationalError as exc:
                raise QueueUnavailable("the job store failed", cause=str(exc)) from exc

        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    def _connect(self) -> None:
        private_dir(self.path.parent)
        check_database(self.path)
        private_file(self.path)
        conn = upkeep.connection(self.path)
        # Only a file with no tables yet takes it: freed pages can go back (upkeep.give_back).
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before enqueue returns, so a job id given out survives a crash.
        conn.execute("PRAGMA synchronous=FULL")
        schema.create(conn)
        self._shrinks = upkeep.shrinks(conn, self.path)
        self._conn = conn

    async def open(self) -> None:
        if self._conn is None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._connect)
            await self._checkpointer.start()
            self._others.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await stop(self._giving_back)
        await self._others.stop()
        await self._checkpointer.stop()

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._thread, shut)
        self._thread.shutdown(wait=True)

    async def ping(self) -> None:
        """A write, as on Redis: a file that no longer takes writes still answers reads."""

        def touch(c: sqlite3.Connection) -> None:
            self._check_room(c)
            c.execute("INSERT OR REPLACE INTO pings (one, at) VALUES (1, ?)", (self._clock(),))

        await self._run(touch, lazy=True)

    def _check_room(self, c: sqlite3.Connection) -> None:
        """DiskLow under the free-space floor, or without room for the job a full disk
        refused. Pages that finished jobs freed in the file count as free: new jobs reuse
        them, though the file system never sees them again."""
        floor = self._floor_bytes()
        if not floor:
            return
        free = shutil.disk_usage(self.path.parent).free
        if free < floor:
            free += upkeep.free_pages_bytes(c)  # read only when needed: 9 us beside the fast model
        if free >= floor:
            self._refused_bytes = 0  # room for the refused job again
            return
        if floor == self.min_free_bytes:
            raise DiskLow(
                f"the job store has {free // upkeep.MIB} MiB free on its disk and in its file,"
                f" under its floor of {floor // upkeep.MIB} MiB",
                free_bytes=free,
                min_free_bytes=floor,
            )
        raise DiskLow(
            f"the job store's disk was full: {free // upkeep.KIB} KiB free on it and in the file,"
            f" where the last job refused needs {floor // upkeep.KIB} KiB",
            free_bytes=free,
            needed_bytes=floor,
        )

    def _floor_bytes(self) -> int:
        return max(self.min_free_bytes, self._refused_bytes)

    async def space(self) -> StoreSpace:
        """The database file and its WAL; room: the disk's and the file's free pages, above
        the floor `_check_room` keeps."""

        def measure(c: sqlite3.Connection) -> StoreSpace:
            free = shutil.disk_usage(self.path.parent).free + upkeep.free_pages_bytes(c)
            return StoreSpace(upkeep.store_bytes(self.path), max(0, free - self._floor_bytes()))

        return await self._run(measure)

    # -- producer side -------------------------------------------------------------------------

    async def enqueue(self, spec: JobSpec) -> Job:
        now = self._clock()
        job = await self._run(lambda c: self._store(c, spec, now))
        self._enqueued.set()
        return job

    def _store(self, c: sqlite3.Connection, spec: JobSpec, now: float) -> Job:
        """`_insert` in a transaction; a full disk is a floor until the job would fit."""
        try:
            job = in_transaction(c, lambda: self._insert(c, spec, now))
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
            self._refused_bytes = 2 * len(spec.image)
            raise DiskLow(
                f"the job store's disk is full: {exc}", needed_bytes=self._refused_bytes
            ) from exc
        return job

    def _insert(self, c: sqlite3.Connection, spec: JobSpec, now: float) -> Job:
        earlier = self._idempotent_job(c, spec.idempotency_slot, now) or _select_job(c, spec.id)
        if earlier is not None:
            return earlier
        share = self.policy.max_queued_per_owner
        if share and spec.owner and _owned(c, spec.owner) >= share:
            raise owner_share_full(share)
        limit = self.policy.max_queue_length
        if limit and _unfinished(c) >= limit:
            raise queue_full(limit)
        self._check_room(c)
        c.execute(
            "INSERT INTO jobs (id, status, created_at, updated_at, meta, owner)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (spec.id, JobStatus.QUEUED, now, now, dump_meta(spec), spec.owner),
        )
        c.execute("INSERT INTO images (job_id, data) VALUES (?, ?)", (spec.id, spec.image))
        if spec.idempotency_slot:
            c.execute(
                "INSERT OR REPLACE INTO idempotency (key, job_id, expires_at) VALUES (?, ?, ?)",
                (spec.idempotency_slot, spec.id, now + self.policy.result_ttl_s),
            )
        # Built, not read back: this runs beside the fast model, and every bit of CPU shows.
        return spec.queued(now)

    @staticmethod
    def _idempotent_job(c: sqlite3.Connection, key: str | None, now: float) -> Job | None:
        """The job `key` stands for, as long as that job is kept: until it finishes, and for
        the result TTL after. The key had lasted the TTL from the first request, and a retry
        after a longer backlog queued the image again."""
        if not key:
            return None
        row = c.execute("SELECT job_id FROM idempotency WHERE key = ?", (key,)).fetchone()
        return _select_job(c, row[0], alive_at=now) if row else None

    async def attach_fast(self, job_id: str, fast: Prediction) -> Prediction | None:
        def attach(c: sqlite3.Connection) -> Prediction | None:
            meta = _meta(c, job_id)
            added = meta_with_fast(job_id, meta, fast) if meta is not None else None
            if added is None:
                return None
            # One statement, so the result it reads is the one there when the answer landed.
            written = c.execute(
                "UPDATE jobs SET meta = ? WHERE id = ? AND meta = ? RETURNING result",
                (added, job_id, meta),
            ).fetchall()
            return load_prediction(written[0][0]) if written else None

        return await self._run(attach, lazy=True)

    async def get(self, job_id: str) -> Job | None:
        now = self._clock()

        return await self._run(lambda c: _select_job(c, job_id, alive_at=now))

    # -- worker side ---------------------------------------------------------------------------

    async def claim(
        self, worker_id: str, limit: int, wait_s: float, until: asyncio.Event | None = None
    ) -> list[Claim]:
        deadline = self._clock() + wait_s
        while True:
            self._enqueued.clear()
            claims = await self._run(lambda c: self._claim(c, worker_id, limit))
            self._changed(claim.id for claim in claims)
            remaining = deadline - self._clock()
            if claims or remaining <= 0 or (until is not None and until.is_set()):
                return claims
            # Another process may enqueue into the same file: poll as well as wait for the event.
            await first_set(self._enqueued, until, within_s=min(remaining, 0.25))

    def _claim(self, c: sqlite3.Connection, worker_id: str, limit: int) -> list[Claim]:
        now = self._clock()

        def lease_all() -> list[Claim | None]:
            return [self._lease(c, row, now, worker_id) for row in _claimable(c, now, limit)]

        return [claim for claim in in_transaction(c, lease_all) if claim is not None]

    def _lease(
        self, c: sqlite3.Connection, row: tuple[str, int, int], now: float, worker_id: str
    ) -> Claim | None:
        job_id, attempts, cancel_requested = row
        if cancel_requested:  # its worker stopped after the client cancelled it: not run again
            self._finish(c, job_id, JobStatus.CANCELLED, now)
            return None
        if attempts >= self.policy.max_attempts:
            self._finish(c, job_id, JobStatus.FAILED, now, error=_LOST.format(n=attempts))
            return None
        image = c.execute("SELECT data FROM images WHERE job_id = ?", (job_id,)).fetchone()
        if image is None:
            self._finish(c, job_id, JobStatus.FAILED, now, error=MISSING_IMAGE)
            return None
        c.execute(
            "UPDATE jobs SET status = ?, attempts = attempts + 1, lease_until = ?, updated_at = ?,"
            " worker = ? WHERE id = ?",
            (JobStatus.RUNNING, now + self.policy.visibility_timeout_s, now, worker_id, job_id),
        )
        try:
            job = _select_job(c, job_id)
        except UnreadableJob as exc:
            self._finish(c, job_id, JobStatus.FAILED, now, error=unreadable_failure(exc))
            return None
        assert job is not None
        return Claim(job, bytes(image[0]), worker_id)

    async def extend(self, worker_id: str, job_ids: Sequence[str]) -> frozenset[str]:
        if not job_ids:
            return frozenset()
        until = self._clock() + self.policy.visibility_timeout_s
        marks = ", ".join("?" * len(job_ids))
        sql = (
            "UPDATE jobs SET lease_until = ?"  # noqa: S608 (placeholders only)
            f" WHERE status = ? AND worker = ? AND id IN ({marks}) RETURNING id"
        )

        def renew(c: sqlite3.Connection) -> frozenset[str]:
            rows = c.execute(sql, (until, JobStatus.RUNNING, worker_id, *job_ids)).fetchall()
            return frozenset(str(job_id) for (job_id,) in rows)

        # Lazily: a renewal lost in a crash only leaves the earlier, shorter lease.
        return await self._run(renew, lazy=True)

    async def complete(self, job_id: str, result: Prediction) -> bool:
        return job_id in (await self.complete_many({job_id: result})).stored

    async def complete_many(
        self,
        results: Mapping[str, Prediction],
        tallies: Mapping[str, Sequence[str]] | None = None,
    ) -> Completed:
        now = self._clock()
        tallies = tallies or {}

        def finish(c: sqlite3.Connection, job_id: str, result: Prediction) -> bool:
            tally = tallies.get(job_id, ())
            return self._finish(
                c, job_id, JobStatus.DONE, now, result=dump_prediction(result), tally=tally
            )

        def finish_all(c: sqlite3.Connection) -> Completed:
            stored = frozenset(
                job_id for job_id, result in results.items() if finish(c, job_id, result)
            )
            untallied = frozenset(
                job_id for job_id in stored if job_id not in tallies and _has_fast(_meta(c, job_id))
            )
            return Completed(stored, untallied)

        completed = await self._run(lambda c: in_transaction(c, lambda: finish_all(c)))
        self._changed(completed.stored)
        return completed

    async def fail(self, job_id: str, error: str, *, retry: bool) -> Job | None:
        now = self._clock()

        def record(c: sqlite3.Connection) -> Job | None:
            row = c.execute(
                "SELECT attempts, cancel_requested FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            # A job its client cancelled is not run again: it ends, cancelled, like a success.
            if retry and row is not None and row[0] < self.policy.max_attempts and not row[1]:
                requeued = c.execute(
                    "UPDATE jobs SET status = ?, lease_until = NULL, error = ?, updated_at = ?"
                    " WHERE id = ? AND status = ?",
                    (JobStatus.QUEUED, error, now, job_id, JobStatus.RUNNING),
                )
                if requeued.rowcount:
                    _bump(c, ["jobs_retried"])
            else:
                self._finish(c, job_id, JobStatus.FAILED, now, error=error)
            return _select_job(c, job_id)

        job = await self._run(lambda c: in_transaction(c, lambda: record(c)))
        self._changed([job_id])
        return job

    def _finish(
        self,
        c: sqlite3.Connection,
        job_id: str,
        status: JobStatus,
        now: float,
        *,
        result: str | None = None,
        error: str | None = None,
        tally: Sequence[str] = (),
    ) -> bool:
        # The image is dropped once a job is final: only the answer is kept until it expires.
        # A run that ends after a cancel request keeps its result or error, but the job says
        # cancelled.
        cursor = c.execute(
            "UPDATE jobs SET status = CASE WHEN cancel_requested = 1 THEN ? ELSE ? END,"
            " result = ?, error = ?, finished_at = ?, updated_at = ?,"
            " expires_at = ?, lease_until = NULL"
            " WHERE id = ? AND status IN (?, ?)",
            (
                JobStatus.CANCELLED,
                status,
                result,
                error,
                now,
                now,
                now + self.policy.result_ttl_s,
                job_id,
                JobStatus.QUEUED,
                JobStatus.RUNNING,
            ),
        )
        if cursor.rowcount != 1:
            return False
        c.execute("DELETE FROM images WHERE job_id = ?", (job_id,))
        _bump(c, [f"jobs_{_status(c, job_id)}", *tally])
        return True

    async def cancel(self, job_id: str) -> Job | None:
        now = self._clock()

        def cancel(c: sqlite3.Connection) -> Job | None:
            if _status(c, job_id) == JobStatus.QUEUED:
                self._finish(c, job_id, JobStatus.CANCELLED, now)
            c.execute(
                "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ? AND status = ?",
                (now, job_id, JobStatus.RUNNING),
            )
            return _select_job(c, job_id, alive_at=now)

        job = await self._run(lambda c: in_transaction(c, lambda: cancel(c)))
        self._changed([job_id])
        return job

    async def record_delivery(self, job_id: str, delivery: Delivery) -> None:
        await self._run(
            lambda c: c.execute(
                "UPDATE jobs SET webhook = ? WHERE id = ?", (dump_delivery(delivery), job_id)
            )
        )

    async def undelivered(self, before: float, limit: int) -> list[Job]:
        def select(c: sqlite3.Connection) -> list[Job]:
            rows = c.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs"  # noqa: S608 (constant)
                " WHERE status IN (?, ?, ?) AND finished_at < ?"
                # CASE: json_extract raises on text that is not JSON, which a damaged record
                # may hold; AND does not promise to test json_valid first.
                " AND CASE WHEN json_valid(meta) THEN json_extract(meta, '$.callback_url') END"
                " IS NOT NULL"
                " AND (webhook IS NULL OR (json_extract(webhook, '$.state') = ?"
                " AND json_extract(webhook, '$.updated_at') < ?))"
                " ORDER BY finished_at LIMIT ?",
                (*sorted(TERMINAL_STATUSES), before, DeliveryState.PENDING, before, limit),
            ).fetchall()
            return _readable(rows)

        return await self._run(select)

    # -- housekeeping --------------------------------------------------------------------------

    async def queue_depth(self) -> int:
        return await self._run(_unfinished)

    async def oldest_unfinished_at(self) -> float | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT MIN(created_at) FROM jobs WHERE status IN (?, ?)",
                (JobStatus.QUEUED, JobStatus.RUNNING),
            ).fetchone()
        )
        return float(row[0]) if row[0] is not None else None

    async def purge_expired(self) -> int:
        """In batches, each its own call on the store's thread: the proxy's enqueues go in
        between. One DELETE of all that expired held the thread as long as it took: 60,000
        rows (after a worker was down) took 0.38 s."""
        now = self._clock()
        forgotten = now - WORKER_FORGOTTEN_S
        await self._run(lambda c: c.execute(FORGET_WORKERS, (forgotten,)), lazy=True)
        purged = await self._purge_all(PURGE_JOBS, now)
        await self._purge_all(PURGE_IDEMPOTENCY, now)  # after the jobs their keys stand for
        self._give_back_later()
        return purged

    async def _purge_all(self, sql: str, now: float) -> int:
        purged = 0
        while True:
            # Lazily: a purge lost in a crash is done again by the next one.
            n = await self._run(lambda c: c.execute(sql, (now, PURGE_BATCH)).rowcount, lazy=True)
            purged += n
            if n < PURGE_BATCH:
                return purged

    def _give_back_later(self) -> None:
        """Start giving free pages back in the background, unless that is under way. Finished
        jobs free their images' pages, and without this a backlog's peak held its disk for good.
        Not within the purge: the worker's loop that calls it claims no job meanwhile."""
        if self._shrinks and (self._giving_back is None or self._giving_back.done()):
            giving = upkeep.give_back(lambda step: self._run(step, lazy=True))
            self._giving_back = asyncio.create_task(giving, name="tandem-give-back")

    async def add_counts(self, counts: Mapping[str, int]) -> None:
        if not counts:
            return
        await self._run(lambda c: in_transaction(c, lambda: _bump(c, counts.items())))

    async def counts(self) -> dict[str, int]:
        rows = await self._run(lambda c: c.execute("SELECT name, value FROM counters").fetchall())
        return {str(name): int(value) for name, value in rows}

    async def beat(self, worker_id: str, model: str) -> None:
        now = self._clock()
        await self._run(
            lambda c: c.execute(
                "INSERT INTO workers (id, model, seen_at) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE"
                " SET model = excluded.model, seen_at = excluded.seen_at",
                (worker_id, model, now),
            )
        )

    async def live_models(self, within_s: float) -> set[str]:
        since = self._clock() - within_s

        def select(c: sqlite3.Connection) -> set[str]:
            rows = c.execute("SELECT DISTINCT model FROM workers WHERE seen_at >= ?", (since,))
            return {model for (model,) in rows}

        return await self._run(select)


def _data_version(c: sqlite3.Connection) -> int:
    return int(c.execute("PRAGMA data_version").fetchone()[0])


class _OtherWriters:
    """Tells watchers of other processes' commits to the file (a worker beside the proxy):
    those move the connection's data_version, its own commits do not. One look every
    RECHECK_S wakes every watcher when it moved; a job nobody else wrote costs no re-reads."""

    def __init__(self, look: Callable[[], Awaitable[int]], hub: Hub) -> None:
        self._look, self._hub = look, hub
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._every_while(), name="tandem-other-writers")

    async def _every_while(self) -> None:
        seen: int | None = None
        faults = Outage(log, "looking for other processes' writes", level=logging.ERROR)
        while True:
            version: int | None = seen  # unless the look succeeds; the next one tries again
            try:
                version = await self._look()
                faults.ended()
            except QueueUnavailable:
                pass
            except Exception as exc:  # nobody awaits this task: a fault would end every wake-up
                faults.failed(f"{exc!r}; trying on", exc_info=True)
            if seen is not None and version != seen:
                self._hub.notify_all()
            seen = version
            await asyncio.sleep(RECHECK_S)

    async def stop(self) -> None:
        await stop(self._task)
        self._task = None


def _bump(c: sqlite3.Connection, counts: Iterable[str] | Iterable[tuple[str, int]]) -> None:
    """Add to counters: names count one each; (name, n) pairs count n."""
    pairs = [(item, 1) if isinstance(item, str) else item for item in counts]
    c.executemany(
        "INSERT INTO counters (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        pairs,
    )


# The oldest jobs a worker may take, each read in the order of the claimable index.
CLAIMABLE_QUEUED = (
    "SELECT id, attempts, cancel_requested, created_at FROM jobs"
    " WHERE status = ? ORDER BY created_at LIMIT ?"
)
CLAIMABLE_EXPIRED = (
    "SELECT id, attempts, cancel_requested, created_at FROM jobs"
    " WHERE status = ? AND lease_until <= ? ORDER BY created_at LIMIT ?"
)

# Rows deleted per call of a purge: about 5 ms of the store's thread.
PURGE_BATCH = 500
PURGE_JOBS = (
    "DELETE FROM jobs WHERE id IN"
    " (SELECT id FROM jobs WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)"
)
# A key goes with its job; its expires_at is the least it is kept (a result TTL from its
# request), which a kept job always outlasts.
PURGE_IDEMPOTENCY = (
    "DELETE FROM idempotency WHERE key IN"
    " (SELECT key FROM idempotency WHERE expires_at <= ?"
    " AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = idempotency.job_id) LIMIT ?)"
)
FORGET_WORKERS = "DELETE FROM workers WHERE seen_at < ?"


def _claimable(c: sqlite3.Connection, now: float, limit: int) -> list[tuple[str, int, int]]:
    """The oldest `limit` jobs a worker may take: queued, or running on a lease that ran out.
    Two reads that follow the index, merged: one query with OR sorted every queued job to
    take a few (0.9 ms at 10,000 queued, on the thread the proxy's enqueues run on)."""
    expired = c.execute(CLAIMABLE_EXPIRED, (JobStatus.RUNNING, now, limit)).fetchall()
    queued = c.execute(CLAIMABLE_QUEUED, (JobStatus.QUEUED, limit)).fetchall()
    oldest = sorted(expired + queued, key=lambda row: row[3])[:limit]
    return [(job_id, attempts, cancel) for job_id, attempts, cancel, _ in oldest]


def _owned(c: sqlite3.Connection, owner: str) -> int:
    row = c.execute("SELECT n FROM owners WHERE owner = ?", (owner,)).fetchone()
    return int(row[0]) if row else 0


def _unfinished(c: sqlite3.Connection) -> int:
    (n,) = c.execute("SELECT n FROM unfinished").fetchone()
    return int(n)


def _status(c: sqlite3.Connection, job_id: str) -> str | None:
    row = c.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return str(row[0]) if row else None


def _meta(c: sqlite3.Connection, job_id: str) -> str | None:
    row = c.execute("SELECT meta FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return str(row[0]) if row else None


def _has_fast(meta: str | None) -> bool:
    """Whether stored metadata holds a fast answer; metadata this version cannot read (a
    newer writer's) counts as none, so that no agreement is tallied from it."""
    try:
        return meta is not None and load_meta(meta).fast is not None
    except ValueError:
        return False


def _select_job(c: sqlite3.Connection, job_id: str, alive_at: float | None = None) -> Job | None:
    row = c.execute(
        f"SELECT {_JOB_COLUMNS}, expires_at FROM jobs WHERE id = ?",  # noqa: S608 (constant)
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    *fields, expires_at = row
    if alive_at is not None and expires_at is not None and expires_at <= alive_at:
        return None
    return _job_from_row(fields)


def _readable(rows: Iterable[list[object]]) -> list[Job]:
    """The jobs of `rows` that this version can read; the others are left for one that can."""
    jobs = []
    for row in rows:
        with contextlib.suppress(UnreadableJob):
            jobs.append(_job_from_row(row))
    return jobs


def _job_from_row(row: list[object]) -> Job:
    job_id, *stored = row
    fields = dict(zip(STORED_FIELDS, stored, strict=True))
    fields["cancel"] = "1" if fields["cancel"] else "0"
    return job_from_stored(str(job_id), fields)
