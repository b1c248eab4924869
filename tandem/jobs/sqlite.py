"""The embedded job store: one SQLite file in WAL mode, durable on every commit.

sqlite3 blocks, so every call runs on one dedicated thread that owns the connection; that also
serialises this process's writes. Other processes on the same file are kept apart by SQLite's
own locking (`BEGIN IMMEDIATE` and a busy timeout). The WAL is moved into the database file
by a thread and connection of their own (`_Checkpointer`), never inside a commit. The pages
that finished jobs free go back to the file system after purges (`_give_back`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TypeVar

from tandem.errors import (
    ConfigurationError,
    DiskLow,
    QueueFull,
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
from tandem.jobs.store import (
    MISSING_IMAGE,
    WORKER_FORGOTTEN_S,
    Completed,
    StorePolicy,
    unreadable_failure,
)
from tandem.outage import Outage
from tandem.predictions import Prediction
from tandem.tasks import stop
from tandem.threads import pool

T = TypeVar("T")
log = logging.getLogger("tandem.jobs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    lease_until REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    meta        TEXT NOT NULL,
    result      TEXT,
    error       TEXT,
    finished_at REAL,
    expires_at  REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    webhook     TEXT,
    worker      TEXT  -- who holds the lease of a running job
);
CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs (status, created_at);
-- Images apart from their jobs: SQLite rewrites a whole row on every update, and reads through
-- a blob's overflow pages to the columns after it; a job's row changes several times.
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT PRIMARY KEY,
    data   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS idempotency (
    key        TEXT PRIMARY KEY,
    job_id     TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id      TEXT PRIMARY KEY,
    model   TEXT NOT NULL,
    seen_at REAL NOT NULL
);
-- What a health check writes: reads go on where writes fail (a full disk, a read-only remount).
CREATE TABLE IF NOT EXISTS pings (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    at  REAL NOT NULL
);
"""

# The number of unfinished jobs, kept by triggers: every enqueue checks it against the queue's
# limit beside the fast model, and COUNT(*) over the status index took 0.3 ms at 2,000 queued
# jobs and 1 ms at 10,000. Created and first counted in one transaction, so no job is missed.
_UNFINISHED = "(" + ", ".join(f"'{s}'" for s in JobStatus if not s.terminal) + ")"
UNFINISHED_COUNT = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS unfinished (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    n   INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS unfinished_insert AFTER INSERT ON jobs
WHEN new.status IN {_UNFINISHED}
BEGIN UPDATE unfinished SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS unfinished_delete AFTER DELETE ON jobs
WHEN old.status IN {_UNFINISHED}
BEGIN UPDATE unfinished SET n = n - 1; END;
CREATE TRIGGER IF NOT EXISTS unfinished_update AFTER UPDATE OF status ON jobs
WHEN (old.status IN {_UNFINISHED}) <> (new.status IN {_UNFINISHED})
BEGIN UPDATE unfinished SET n = n + CASE WHEN new.status IN {_UNFINISHED} THEN 1 ELSE -1 END; END;
INSERT OR IGNORE INTO unfinished (one, n)
SELECT 1, COUNT(*) FROM jobs WHERE status IN {_UNFINISHED};
COMMIT;
"""  # noqa: S608 (built from JobStatus, not from input)

# In the order of records.STORED_FIELDS, after the id.
_JOB_COLUMNS = (
    "id, status, created_at, updated_at, attempts, meta, result, error, finished_at,"
    " cancel_requested, webhook"
)
_LOST = "the worker running this job stopped {n} times before finishing it"
RECHECK_S = 0.5
CHECKPOINT_EVERY_S = 1.0
# The checkpoint copies megabytes a second beside the fast model: it gets the cores last.
CHECKPOINT_NICE = 19
MIB = 1024 * 1024
INCREMENTAL = 2  # PRAGMA auto_vacuum's value for incremental vacuum
# Free pages kept for new jobs to reuse, so that a steady flow of jobs moves no pages.
KEEP_FREE_BYTES = 64 * MIB
# A step moves pages in use at the end of the file to free ones nearer its start, then
# truncates. Taking each free page off SQLite's free list searches it: after a backlog of
# 10,000 photos drained, 32 pages took 2 ms (58 us a page), in a test's file 6 us a page.
# An enqueue waits for at most one step; after each, the store's thread is left alone three
# times as long, so that giving back takes at most a quarter of it.
RECLAIM_STEP_PAGES = 32
RECLAIM_PAUSE_RATIO = 3.0
# The WAL is started over past this, and its file cut back to it: the file keeps the size
# its busiest spell gave it (1 GB after a backlog of 470 MB). Starting over costs the store's
# thread 35 to 40 ms (see _start_wal_over); at 64 MiB, that raised the 16-client p99 by 7 and
# 17 % in an A/B, at 256 MiB by nothing that A/B runs could tell from noise.
WAL_KEPT_BYTES = 256 * MIB
WAL_FRAME_HEADER_BYTES = 24
START_OVER_WAIT_MS = 50
BUSY_TIMEOUT_MS = 10_000


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
        self._conn: sqlite3.Connection | None = None
        self._shrinks = False
        self._page_bytes = 4096
        self._giving_back: asyncio.Task[None] | None = None
        self._closed = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-sqlite")
        # Wakes an in-process worker as soon as a job is enqueued instead of at its next poll.
        self._enqueued = asyncio.Event()
        # Watchers hear of this process's writes at once; other processes' within RECHECK_S.
        self._hub = Hub()
        self._others = _OtherWriters(lambda: self._run(_data_version), self._hub)
        self._checkpointer = _Checkpointer(
            path, CHECKPOINT_EVERY_S, start_over=lambda: self._run(_start_wal_over)
        )

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
                with _lazily(conn):
                    return fn(conn)
            except sqlite3.OperationalError as exc:
                raise QueueUnavailable(f"the job store failed: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    def _connect(self) -> None:
        private_dir(self.path.parent)
        check_database(self.path)
        private_file(self.path)
        conn = _connection(self.path)
        # Only a file with no tables yet takes it: lets freed pages be given back (_give_back).
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before enqueue returns, so a job id given out survives a crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        _migrate(conn)
        conn.executescript(UNFINISHED_COUNT)
        self._shrinks = _shrinks(conn, self.path)
        self._page_bytes = _page_size(conn)
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
        """DiskLow under the free-space floor. Pages that finished jobs freed in the file
        count as free: new jobs reuse them, though the file system never sees them again."""
        if not self.min_free_bytes:
            return
        space = os.statvfs(self.path.parent)
        free = space.f_bavail * space.f_frsize
        if free < self.min_free_bytes:
            free += _free_pages_bytes(c)  # read only when needed: 9 us beside the fast model
        if free < self.min_free_bytes:
            raise DiskLow(
                f"the job store has {free // MIB} MiB free on its disk and in its file,"
                f" under its floor of {self.min_free_bytes // MIB} MiB",
                free_bytes=free,
                min_free_bytes=self.min_free_bytes,
            )

    # -- producer side -------------------------------------------------------------------------

    async def enqueue(self, spec: JobSpec) -> Job:
        now = self._clock()
        job = await self._run(lambda c: _in_transaction(c, lambda: self._insert(c, spec, now)))
        self._enqueued.set()
        return job

    def _insert(self, c: sqlite3.Connection, spec: JobSpec, now: float) -> Job:
        earlier = self._idempotent_job(c, spec.idempotency_slot, now) or _select_job(c, spec.id)
        if earlier is not None:
            return earlier
        limit = self.policy.max_queue_length
        if limit and _unfinished(c) >= limit:
            raise QueueFull(f"the queue holds {limit} jobs, its limit", limit=limit)
        self._check_room(c)
        c.execute(
            "INSERT INTO jobs (id, status, created_at, updated_at, meta) VALUES (?, ?, ?, ?, ?)",
            (spec.id, JobStatus.QUEUED, now, now, dump_meta(spec)),
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
        if not key:
            return None
        row = c.execute(
            "SELECT job_id FROM idempotency WHERE key = ? AND expires_at > ?", (key, now)
        ).fetchone()
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

    async def claim(self, worker_id: str, limit: int, wait_s: float) -> list[Claim]:
        deadline = self._clock() + wait_s
        while True:
            self._enqueued.clear()
            claims = await self._run(lambda c: self._claim(c, worker_id, limit))
            self._changed(claim.id for claim in claims)
            remaining = deadline - self._clock()
            if claims or remaining <= 0:
                return claims
            # Another process may enqueue into the same file: poll as well as wait for the event.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._enqueued.wait(), timeout=min(remaining, 0.25))

    def _claim(self, c: sqlite3.Connection, worker_id: str, limit: int) -> list[Claim]:
        now = self._clock()

        def lease_all() -> list[Claim | None]:
            return [self._lease(c, row, now, worker_id) for row in _claimable(c, now, limit)]

        return [claim for claim in _in_transaction(c, lease_all) if claim is not None]

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

        completed = await self._run(lambda c: _in_transaction(c, lambda: finish_all(c)))
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

        job = await self._run(lambda c: _in_transaction(c, lambda: record(c)))
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

        job = await self._run(lambda c: _in_transaction(c, lambda: cancel(c)))
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
        await self._purge_all(PURGE_IDEMPOTENCY, now)
        forgotten = now - WORKER_FORGOTTEN_S
        await self._run(lambda c: c.execute(FORGET_WORKERS, (forgotten,)), lazy=True)
        purged = await self._purge_all(PURGE_JOBS, now)
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
            self._giving_back = asyncio.create_task(self._give_back(), name="tandem-give-back")

    async def _give_back(self) -> None:
        """Give the file system the free pages beyond KEEP_FREE_BYTES, a step at a time, each
        followed by a pause (see RECLAIM_PAUSE_RATIO)."""
        pages, started = 0, time.monotonic()
        try:
            while True:
                step_started = time.monotonic()
                step = await self._run(_reclaim_step, lazy=True)  # a crash undoes one step
                pages += step
                if step < RECLAIM_STEP_PAGES:
                    break
                await asyncio.sleep((time.monotonic() - step_started) * RECLAIM_PAUSE_RATIO)
        except QueueUnavailable as exc:  # moving pages writes: a disk near full may refuse it
            log.warning("%s, giving pages back; the next purge tries again", exc.message)
        finally:
            if pages:
                log.info(
                    "the job store gave %d MiB back to the file system in %.0f s",
                    pages * self._page_bytes // MIB,
                    time.monotonic() - started,
                )

    async def add_counts(self, counts: Mapping[str, int]) -> None:
        if not counts:
            return
        await self._run(lambda c: _in_transaction(c, lambda: _bump(c, counts.items())))

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


def check_database(path: Path) -> None:
    """ConfigurationError, saying why, if `path` exists and SQLite cannot read it (another
    kind of file, or a damaged one): a reason at start-up, not a failure at each request."""
    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:  # OperationalError included: unreadable, locked
        raise ConfigurationError(f"the job store {path} cannot be opened: {exc}") from exc


def _connection(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # No checkpoint inside a commit: the one that crossed 1000 pages of WAL (about every 26th
    # enqueue of a 136 KB photo) waited some 20 ms for it, and set the 1-client p99.
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(f"PRAGMA journal_size_limit={WAL_KEPT_BYTES}")
    return conn


def _start_wal_over(c: sqlite3.Connection) -> None:
    """A RESTART checkpoint, after which the next commit writes the WAL from its start (and cuts
    it back to WAL_KEPT_BYTES). It holds the write lock while it copies what the last PASSIVE
    one left, syncs the database file (35 to 40 ms here while the file grew, however little
    was left) and waits for readers to leave the WAL: on the store's thread, since at
    CHECKPOINT_NICE it would hold the lock while waiting for the cores, and for
    START_OVER_WAIT_MS at most, since a reader such as a backup may take minutes (the next
    round tries again)."""
    c.execute(f"PRAGMA busy_timeout={START_OVER_WAIT_MS}")
    try:
        c.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
    finally:
        c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def _shrinks(c: sqlite3.Connection, path: Path) -> bool:
    """Whether the file gives freed pages back; says how to make one of an earlier version do."""
    if int(c.execute("PRAGMA auto_vacuum").fetchone()[0]) == INCREMENTAL:
        return True
    log.info(
        "the job store %s was made by an earlier version and does not shrink: the pages that"
        " finished jobs free are reused, not given back. To change that, while nothing has it"
        ' open: sqlite3 %s "PRAGMA auto_vacuum=INCREMENTAL; VACUUM;"',
        path,
        path,
    )
    return False


def _reclaim_step(c: sqlite3.Connection) -> int:
    """Give back up to RECLAIM_STEP_PAGES free pages beyond KEEP_FREE_BYTES; how many."""
    pages = min((_free_pages_bytes(c) - KEEP_FREE_BYTES) // _page_size(c), RECLAIM_STEP_PAGES)
    if pages <= 0:
        return 0
    # executescript steps the pragma to its end: execute stops after its first page.
    c.executescript(f"PRAGMA incremental_vacuum({pages})")
    return pages


def _page_size(c: sqlite3.Connection) -> int:
    return int(c.execute("PRAGMA page_size").fetchone()[0])


@contextlib.contextmanager
def _lazily(conn: sqlite3.Connection) -> Iterator[None]:
    """Commits skip their fsync meanwhile. The setting is per connection, and one connection
    makes every write of this process, lazy or not, so that none moves its data_version."""
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        conn.execute("PRAGMA synchronous=FULL")


def _free_pages_bytes(c: sqlite3.Connection) -> int:
    pages = c.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages) * _page_size(c)


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


class _Checkpointer:
    """Moves the WAL into the database file every `every_s`, on a thread and connection of
    its own. A PASSIVE checkpoint waits for no reader or writer: commits go on meanwhile.

    The next commit after a checkpoint that copied the whole WAL writes it from its start.
    Under commits that never pause, none does, and the WAL grew for as long as they came (11 MB
    a second at a proxy's 160 requests/s): past WAL_KEPT_BYTES, `start_over` is called."""

    def __init__(
        self, path: Path, every_s: float, start_over: Callable[[], Awaitable[object]]
    ) -> None:
        self._path, self._every_s, self._start_over = path, every_s, start_over
        self._thread = pool("tandem-checkpoint", 1, CHECKPOINT_NICE)
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._thread, _connection, self._path)
        self._task = asyncio.create_task(self._every_while(), name="tandem-checkpoint")

    async def _every_while(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._every_s)
            with contextlib.suppress(sqlite3.Error, QueueUnavailable):  # the next round tries
                wal_bytes = await loop.run_in_executor(self._thread, self._checkpoint)
                if wal_bytes > WAL_KEPT_BYTES:
                    await self._start_over()

    def _checkpoint(self) -> int:
        """A PASSIVE checkpoint; the bytes in the WAL it found."""
        assert self._conn is not None
        [(_, frames, _)] = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return max(int(frames), 0) * (_page_size(self._conn) + WAL_FRAME_HEADER_BYTES)

    async def stop(self) -> None:
        """The last connection to close checkpoints what is left (SQLite does that itself)."""
        await stop(self._task)
        self._task = None
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._conn.close)
            self._conn = None
        self._thread.shutdown(wait=True)


def _migrate(c: sqlite3.Connection) -> None:
    """Bring a job file an earlier version made to this version's layout."""
    columns = {row[1] for row in c.execute("PRAGMA table_info(jobs)")}
    if "webhook" not in columns:
        c.execute("ALTER TABLE jobs ADD COLUMN webhook TEXT")
    if "worker" not in columns:
        c.execute("ALTER TABLE jobs ADD COLUMN worker TEXT")
    if "image" in columns:  # images lived in the jobs table before they had their own
        _in_transaction(c, lambda: _move_images(c))


def _move_images(c: sqlite3.Connection) -> None:
    if "image" not in {row[1] for row in c.execute("PRAGMA table_info(jobs)")}:
        return  # another process opening the same file moved them first
    c.execute(
        "INSERT OR IGNORE INTO images (job_id, data)"
        " SELECT id, image FROM jobs WHERE image IS NOT NULL"
    )
    c.execute("ALTER TABLE jobs DROP COLUMN image")


def _in_transaction(c: sqlite3.Connection, body: Callable[[], T]) -> T:
    """Run `body` holding SQLite's write lock, so check-then-write steps are atomic."""
    c.execute("BEGIN IMMEDIATE")
    try:
        result = body()
    except BaseException:
        # Some errors (a full disk, an I/O error) have rolled it back already: a second
        # ROLLBACK would raise, and hide the error that says what went wrong.
        if c.in_transaction:
            c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")
    return result


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
PURGE_IDEMPOTENCY = (
    "DELETE FROM idempotency WHERE key IN"
    " (SELECT key FROM idempotency WHERE expires_at <= ? LIMIT ?)"
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
