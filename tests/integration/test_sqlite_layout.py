"""The SQLite store's own layout: images apart from their jobs, and files of earlier versions."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tandem.errors import ConfigurationError, DiskLow, QueueUnavailable
from tandem.jobs.records import JobSpec, JobStatus, dump_meta, new_job_id
from tandem.jobs.sqlite import MIB, SQLiteJobStore, schema, upkeep
from tandem.jobs.sqlite import store as sqlite_store
from tandem.jobs.store import StorePolicy
from tests.support import ANSWER, fill

# The jobs table as earlier versions made it: the image inline, in the row; no lease owner.
EARLIER_JOBS = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, lease_until REAL, attempts INTEGER NOT NULL DEFAULT 0,
    image BLOB, meta TEXT NOT NULL, result TEXT, error TEXT, finished_at REAL,
    expires_at REAL, cancel_requested INTEGER NOT NULL DEFAULT 0, webhook TEXT
);
"""


def _tables(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as c:
        return {
            table: c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608
            for table in ("jobs", "images")
        }


async def test_an_image_is_kept_apart_and_dropped_once_its_job_is_final(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        spec = JobSpec(id=new_job_id(), image=b"\xff\xd8 bytes")
        await store.enqueue(spec)
        assert _tables(store.path) == {"jobs": 1, "images": 1}
        [claim] = await store.claim("w", 1, 0)
        assert claim.image == spec.image
        await store.complete(spec.id, ANSWER)
        assert _tables(store.path) == {"jobs": 1, "images": 0}
    finally:
        await store.close()


async def test_a_file_from_an_earlier_version_keeps_its_queued_jobs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    spec = JobSpec(id=new_job_id(), image=b"\x89PNG queued before the upgrade")
    with sqlite3.connect(path) as c:
        c.executescript(EARLIER_JOBS)
        c.execute(
            "INSERT INTO jobs (id, status, created_at, updated_at, image, meta)"
            " VALUES (?, ?, 1.0, 1.0, ?, ?)",
            (spec.id, JobStatus.QUEUED, spec.image, dump_meta(spec)),
        )
    store = SQLiteJobStore(path)
    await store.open()
    try:
        assert await store.queue_depth() == 1  # counted when the count was first made
        [claim] = await store.claim("w", 1, 0)
        assert claim.image == spec.image
        assert await store.extend("w", [spec.id]) == {spec.id}  # its lease has an owner now
        with sqlite3.connect(path) as c:
            columns = {row[1] for row in c.execute("PRAGMA table_info(jobs)")}
        assert "image" not in columns
        assert "owner" in columns  # a job that came with no key counts for no key
    finally:
        await store.close()


def _unfinished_by_scan(path: Path) -> int:
    with sqlite3.connect(path) as c:
        (n,) = c.execute(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
        ).fetchone()
    return int(n)


async def test_the_kept_count_of_unfinished_jobs_agrees_with_the_table(tmp_path: Path) -> None:
    now = [1000.0]
    store = SQLiteJobStore(tmp_path / "jobs.db", StorePolicy(result_ttl_s=60), lambda: now[0])
    await store.open()
    try:
        ids = [new_job_id() for _ in range(6)]
        for job_id in ids:
            await store.enqueue(JobSpec(id=job_id, image=b"image"))
        await store.enqueue(JobSpec(id=ids[0], image=b"image"))  # the same job: no new one
        claims = await store.claim("w", 4, 0)
        await store.complete(claims[0].job.id, ANSWER)
        await store.fail(claims[1].job.id, "again", retry=True)
        await store.fail(claims[2].job.id, "for good", retry=False)
        await store.cancel(ids[5])
        assert await store.queue_depth() == _unfinished_by_scan(store.path) == 3
        now[0] += 3600  # the finished jobs expire, and purging them counts nothing off
        assert await store.purge_expired() == 3
        assert await store.queue_depth() == _unfinished_by_scan(store.path) == 3
    finally:
        await store.close()


def _owned_by_scan(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as c:
        rows = c.execute(
            "SELECT owner, COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
            " AND owner IS NOT NULL GROUP BY owner"
        ).fetchall()
    return dict(rows)


def _owned_as_kept(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as c:
        return dict(c.execute("SELECT owner, n FROM owners").fetchall())


async def test_the_kept_counts_of_each_owner_agree_with_the_table(tmp_path: Path) -> None:
    now = [1000.0]
    store = SQLiteJobStore(tmp_path / "jobs.db", StorePolicy(result_ttl_s=60), lambda: now[0])
    await store.open()
    try:
        ids = [new_job_id() for _ in range(6)]
        for job_id, owner in zip(ids, ("a", "a", "a", "b", "b", None), strict=True):
            await store.enqueue(JobSpec(id=job_id, image=b"image", owner=owner))
        assert len(await store.claim("w", 3, 0)) == 3  # the oldest: a's three
        await store.complete(ids[0], ANSWER)
        await store.fail(ids[1], "again", retry=True)
        await store.fail(ids[2], "for good", retry=False)
        await store.cancel(ids[3])
        assert _owned_as_kept(store.path) == _owned_by_scan(store.path) == {"a": 1, "b": 1}
        now[0] += 3600  # the finished jobs expire, and purging them counts nothing off
        await store.purge_expired()
        assert _owned_as_kept(store.path) == _owned_by_scan(store.path) == {"a": 1, "b": 1}
        for job_id in ids:
            await store.cancel(job_id)
        assert _owned_as_kept(store.path) == {}  # an owner with nothing in hand has no row
    finally:
        await store.close()


async def test_a_big_purge_lets_enqueues_in_between_its_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One DELETE of a day's finished jobs (after a worker was down) held the store's one
    thread, and every enqueue of the proxy behind it, for seconds: 60,000 rows took 0.38 s."""
    monkeypatch.setattr(sqlite_store, "PURGE_BATCH", 10)
    now = [1000.0]
    store = SQLiteJobStore(tmp_path / "jobs.db", StorePolicy(result_ttl_s=60), lambda: now[0])
    await store.open()
    try:
        keyed = [
            JobSpec(id=new_job_id(), image=b"image", idempotency_key=f"k{i}") for i in range(25)
        ]
        for spec in [*keyed, *(JobSpec(id=new_job_id(), image=b"image") for _ in range(25))]:
            await store.enqueue(spec)
        claims = await store.claim("w", 50, 0)
        await store.complete_many({claim.id: ANSWER for claim in claims})
        now[0] += 120
        finished: list[str] = []

        async def purge() -> int:
            purged = await store.purge_expired()
            finished.append("purge")
            return purged

        async def enqueue() -> None:
            await store.enqueue(JobSpec(id=new_job_id(), image=b"image"))
            finished.append("enqueue")

        purged, _ = await asyncio.gather(purge(), enqueue())
        assert purged == 50
        assert finished == ["enqueue", "purge"]
        with sqlite3.connect(store.path) as c:
            assert c.execute("SELECT COUNT(*) FROM idempotency").fetchone() == (0,)
        assert await store.queue_depth() == 1
    finally:
        await store.close()


async def _enqueue_megabytes(store: SQLiteJobStore, megabytes: int) -> None:
    for _ in range(megabytes * 10):
        await store.enqueue(JobSpec(id=new_job_id(), image=os.urandom(100_000)))


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def _eventually(holds: Callable[[], bool], failure: Callable[[], str]) -> None:
    """Wait up to 10 s for `holds`: what it looks at changes on another thread or in a task,
    looked at, not awaited."""
    for _ in range(200):
        if holds():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(failure())


async def _grown(path: Path, size: int) -> None:
    await _eventually(lambda: _size(path) > size, lambda: f"{path} stayed at {_size(path)} bytes")


async def test_commits_leave_the_wal_to_the_checkpointer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upkeep, "CHECKPOINT_EVERY_S", 3600.0)  # not within this test
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        # 6 MB: SQLite's own checkpoint would have run inside a commit at 4 MB (1000 pages).
        await _enqueue_megabytes(store, 6)
        assert _size(store.path) < 1_000_000
        assert _size(tmp_path / "jobs.db-wal") > 6_000_000
    finally:
        await store.close()
    # The last connection to close moved the WAL into the database file.
    assert _size(store.path) > 6_000_000
    assert _size(tmp_path / "jobs.db-wal") == 0


async def test_the_checkpointer_moves_the_wal_into_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upkeep, "CHECKPOINT_EVERY_S", 0.05)
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        await _enqueue_megabytes(store, 6)
        await _grown(store.path, 6_000_000)
        assert len(await store.claim("w", 100, 0)) == 60  # every job still there
    finally:
        await store.close()


@pytest.fixture
async def small_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SQLiteJobStore]:
    """A store checkpointing every 50 ms, its WAL kept to 1 MiB."""
    monkeypatch.setattr(upkeep, "CHECKPOINT_EVERY_S", 0.05)
    monkeypatch.setattr(upkeep, "WAL_KEPT_BYTES", MIB)
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_the_wal_is_cut_back_after_a_busy_spell(small_wal: SQLiteJobStore) -> None:
    await _enqueue_megabytes(small_wal, 6)  # all in one WAL, faster than its checkpoints
    await _grown(small_wal.path, 6_000_000)
    wal = small_wal.path.with_name("jobs.db-wal")
    # The next commit starts it over, unless it meets a read of the WAL (a checkpoint's, on a
    # loaded machine): then the one after it does.
    for _ in range(5):
        await small_wal.enqueue(JobSpec(id=new_job_id(), image=b"image"))
        if _size(wal) <= MIB:
            break
        await asyncio.sleep(0.06)  # a checkpoint between
    assert _size(wal) <= MIB


def _tries_of(monkeypatch: pytest.MonkeyPatch, step: str) -> list[bool]:
    """What each call of the WAL step `upkeep.<step>` gave, from now on."""
    tries: list[bool] = []
    run = getattr(upkeep, step)

    def counted(c: sqlite3.Connection) -> bool:
        tries.append(run(c))
        return tries[-1]

    monkeypatch.setattr(upkeep, step, counted)
    return tries


@pytest.fixture
def short_wal_windows(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """WAL windows of 0.3 s, and what each try to empty the WAL gave."""
    monkeypatch.setattr(upkeep, "WAL_WINDOW_S", 0.3)
    return _tries_of(monkeypatch, "empty_wal")


async def test_a_wal_left_idle_gives_its_file_back(
    small_wal: SQLiteJobStore,
    short_wal_windows: list[bool],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cut back to WAL_KEPT_BYTES, the file still kept 256 MiB (by default) of disk for as
    long as the store sat idle after a busy spell: a soak's backlog left it so for good."""
    monkeypatch.setattr(upkeep, "WAL_SLACK_BYTES", 0)
    caplog.set_level(logging.INFO, logger="tandem.jobs")
    wal = small_wal.path.with_name("jobs.db-wal")
    await _enqueue_megabytes(small_wal, 3)
    assert _size(wal) > 0
    await _eventually(lambda: _size(wal) == 0, lambda: f"the WAL stayed at {_size(wal)} bytes")
    await small_wal.enqueue(JobSpec(id=new_job_id(), image=b"image"))  # it writes on
    assert len(await small_wal.claim("w", 100, 0)) == 31  # every job still there
    assert short_wal_windows[0] is True
    assert "the job store's WAL gave" in caplog.text


async def test_a_wal_far_larger_than_its_commits_need_is_emptied_while_they_come(
    small_wal: SQLiteJobStore, short_wal_windows: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle is not the only sign: a store has small commits now and then (the worker's purge,
    once a minute), which had kept a file of 256 MiB from ever being emptied."""
    monkeypatch.setattr(upkeep, "WAL_SLACK_BYTES", 0)
    await _enqueue_megabytes(small_wal, 3)
    # Some 5 windows; up to 30 where busy cores keep the checkpoints at nice 19 waiting.
    ends, sizes = time.monotonic() + 10.0, itertools.cycle([1_000, 9_000, 17_000])
    while True not in short_wal_windows and time.monotonic() < ends:
        await small_wal.enqueue(JobSpec(id=new_job_id(), image=os.urandom(next(sizes))))
        await asyncio.sleep(0.03)  # a commit or two in each checkpoint's round of 0.05 s
    assert True in short_wal_windows


async def test_a_wal_file_about_the_size_its_commits_need_is_kept(
    small_wal: SQLiteJobStore, short_wal_windows: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emptying it would only take the write lock, and the file would grow again."""
    monkeypatch.setattr(upkeep, "WAL_SLACK_BYTES", 0)
    for size in range(15):  # photos differ in size: alike commits would look like none
        await small_wal.enqueue(JobSpec(id=new_job_id(), image=os.urandom(20_000 + 5_000 * size)))
        await asyncio.sleep(0.1)
    assert short_wal_windows == []


async def test_a_wal_file_under_the_slack_is_kept(
    small_wal: SQLiteJobStore, short_wal_windows: list[bool]
) -> None:
    """Under WAL_SLACK_BYTES (16 MiB) a file is not worth the write lock, however idle."""
    await _enqueue_megabytes(small_wal, 3)
    await asyncio.sleep(1.0)  # some 3 windows
    assert short_wal_windows == []
    assert _size(small_wal.path.with_name("jobs.db-wal")) > 0


async def test_an_idle_wal_is_started_over_once_not_at_every_checkpoint(
    small_wal: SQLiteJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started over, the WAL keeps its length until the next commit: each checkpoint had
    started it over again, 35 to 40 ms of the store's thread a second while idle."""
    tries = _tries_of(monkeypatch, "start_wal_over")
    # Past the 1 MiB kept in one commit: commits a checkpoint apart may each need a start-over.
    await small_wal.enqueue(JobSpec(id=new_job_id(), image=os.urandom(3 * MIB)))
    await _eventually(lambda: bool(tries), lambda: "the WAL was never started over")
    await asyncio.sleep(1.0)  # some 20 checkpoints
    assert tries == [True]


async def _write_without_pause(store: SQLiteJobStore, seconds: float) -> int:
    """Enqueue 100 KB jobs back to back for `seconds`; the largest the WAL was meanwhile."""
    wal, largest = store.path.with_name(store.path.name + "-wal"), 0
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        await store.enqueue(JobSpec(id=new_job_id(), image=os.urandom(100_000)))
        largest = max(largest, _size(wal))
    return largest


async def test_the_wal_starts_over_under_writes_that_never_pause(
    small_wal: SQLiteJobStore,
) -> None:
    """A passive checkpoint never finds the WAL all copied while commits keep coming, and
    only then does the next commit start it over: at a proxy's 160 requests/s it had grown
    11 MB a second, for as long as they came."""
    largest = await _write_without_pause(small_wal, 3.0)
    through = await small_wal.queue_depth() * 100_000
    # 1 MiB, and what comes between two checkpoints; it had been all that went through.
    assert through > 10 * MIB
    assert largest < through / 4


# A query that keeps a connection busy for some 18 s here, unless it is interrupted.
COUNT_A_WHILE = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000)"
    " SELECT COUNT(*) FROM n"
)


@pytest.fixture
def starved_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints at CHECKPOINT_NICE wait for the cores, as where other processes keep them
    busy: each first keeps its connection busy for a while, unless it is interrupted."""
    checkpoint = upkeep.Checkpointer._checkpoint

    def starved(self: upkeep.Checkpointer) -> tuple[int, int]:
        if threading.current_thread().name.startswith("tandem-checkpoint_"):
            assert self._conn is not None
            self._conn.execute(COUNT_A_WHILE).fetchall()
        return checkpoint(self)

    monkeypatch.setattr(upkeep.Checkpointer, "_checkpoint", starved)


async def test_the_wal_keeps_its_cap_while_its_checkpoints_wait_for_busy_cores(
    starved_checkpoints: None, small_wal: SQLiteJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    """At nice 19, a checkpoint gets some 1 % of a core beside processes that keep both busy
    at nice 0: the WAL grew for as long as writes that never pause came (three tests here
    failed beside two busy loops). Once one has, they run at the process's priority awhile."""
    caplog.set_level(logging.WARNING, logger="tandem.jobs")
    largest = await _write_without_pause(small_wal, 3.0)
    through = await small_wal.queue_depth() * 100_000
    assert through > 10 * MIB
    assert largest < through / 4
    [said] = [r.getMessage() for r in caplog.records if "busy cores" in r.getMessage()]
    assert "checkpoints run at the process's priority for the next 60 s" in said


async def test_closing_does_not_wait_for_a_checkpoint_that_waits_for_the_cores(
    starved_checkpoints: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a busy machine, the checkpoint at nice 19 may copy for minutes: a shutdown (SIGTERM,
    a deploy) waited for it. The store's own connection, closed last, checkpoints the rest."""
    monkeypatch.setattr(upkeep, "CHECKPOINT_EVERY_S", 0.05)
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    await _enqueue_megabytes(store, 1)
    await asyncio.sleep(0.2)  # a checkpoint under way
    started = time.monotonic()
    await store.close()
    assert time.monotonic() - started < 5.0  # not the 18 s the checkpoint waits
    assert _size(tmp_path / "jobs.db") > 1_000_000
    assert _size(tmp_path / "jobs.db-wal") == 0


async def test_a_reader_that_holds_the_wal_does_not_hold_up_writes(
    small_wal: SQLiteJobStore,
) -> None:
    """Starting the WAL over waits for readers, such as a backup; not for long."""
    await small_wal.enqueue(JobSpec(id=new_job_id(), image=b"image"))
    with contextlib.closing(sqlite3.connect(small_wal.path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchone()  # a snapshot, held
        started = time.monotonic()
        await _write_without_pause(small_wal, 1.0)
        slowest = await _slowest_enqueue(small_wal, 10)
        reader.execute("COMMIT")
    assert slowest < 1.0  # not the 10 s busy timeout
    assert time.monotonic() - started < 5.0


async def test_a_reader_that_holds_the_wal_is_waited_for_less_and_less_often(
    small_wal: SQLiteJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try to start the WAL over holds the store's thread up for up to 50 ms: a backup
    reading for minutes had cost it 50 ms a second."""
    tries = _tries_of(monkeypatch, "start_wal_over")
    await small_wal.enqueue(JobSpec(id=new_job_id(), image=b"image"))
    with contextlib.closing(sqlite3.connect(small_wal.path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchone()  # a snapshot, held
        await _write_without_pause(small_wal, 2.0)  # some 40 checkpoints, each past 1 MiB
        reader.execute("COMMIT")
    held_off = len(tries)
    assert not any(tries)
    assert 2 <= held_off <= 8  # waits of 0.05, 0.1, 0.2, 0.4 and 0.8 s between them
    await _write_without_pause(small_wal, 3.0)
    assert any(tries[held_off:])  # the reader gone, the next try starts it over


async def _slowest_enqueue(store: SQLiteJobStore, n: int) -> float:
    slowest = 0.0
    for _ in range(n):
        started = time.monotonic()
        await store.enqueue(JobSpec(id=new_job_id(), image=os.urandom(100_000)))
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.06)  # a checkpoint between each
    return slowest


async def _finished_megabytes(store: SQLiteJobStore, megabytes: int) -> None:
    """Jobs whose images, `megabytes` of them, are dropped: their pages are free."""
    await _enqueue_megabytes(store, megabytes)
    claims = await store.claim("w", megabytes * 10, 0)
    await store.complete_many({claim.id: ANSWER for claim in claims})


def _free_pages(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as c:
        return int(c.execute("PRAGMA freelist_count").fetchone()[0])


async def _logged(caplog: pytest.LogCaptureFixture, pattern: str) -> None:
    await _eventually(
        lambda: re.search(pattern, caplog.text) is not None,
        lambda: f"nothing logged matched {pattern!r}: {caplog.text}",
    )


async def _free_at_most(path: Path, pages: int) -> None:
    await _eventually(
        lambda: _free_pages(path) <= pages, lambda: f"{path} kept {_free_pages(path)} free pages"
    )


async def test_a_purge_gives_back_the_pages_of_finished_jobs_beyond_a_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(upkeep, "KEEP_FREE_BYTES", 2 * MIB)
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        await _finished_megabytes(store, 12)
        await store.enqueue(JobSpec(id=new_job_id(), image=os.urandom(100_000)))  # kept
        with caplog.at_level(logging.INFO, logger="tandem.jobs"):
            assert await store.purge_expired() == 0  # nothing expired; the pages count
            await _logged(caplog, r"gave \d+ MiB back to the file system in \d+ s")
        assert 2 * MIB - 4096 <= _free_pages(store.path) * 4096 <= 2 * MIB
    finally:
        await store.close()
    assert _size(store.path) < 4 * MIB  # not the 12 MB the images took
    store = SQLiteJobStore(store.path)
    await store.open()
    try:
        assert len(await store.claim("w", 10, 0)) == 1  # the job moved, whole
    finally:
        await store.close()


@pytest.fixture
async def freed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SQLiteJobStore]:
    """A store with 2 MB of pages that finished jobs freed, all to give back, 16 a step."""
    monkeypatch.setattr(upkeep, "KEEP_FREE_BYTES", 0)
    monkeypatch.setattr(upkeep, "RECLAIM_STEP_PAGES", 16)
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        await _finished_megabytes(store, 2)
        yield store
    finally:
        await store.close()


async def test_pages_are_given_back_after_the_purge_with_enqueues_in_between(
    freed: SQLiteJobStore,
) -> None:
    """The worker's loop that purges claims nothing until the purge returns."""
    await freed.purge_expired()
    free = _free_pages(freed.path)
    assert free > 400  # of some 500: a step or two given back so far
    await freed.enqueue(JobSpec(id=new_job_id(), image=b"image"))
    assert _free_pages(freed.path) > 0  # the enqueue came in between the steps
    await _free_at_most(freed.path, 0)


async def test_giving_pages_back_leaves_the_store_s_thread_alone_most_of_the_time(
    freed: SQLiteJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[tuple[float, float]] = []
    step = upkeep.reclaim_step

    def timed(c: sqlite3.Connection) -> int:
        started = time.monotonic()
        try:
            return step(c)
        finally:
            steps.append((started, time.monotonic()))

    monkeypatch.setattr(upkeep, "reclaim_step", timed)
    monkeypatch.setattr(upkeep, "RECLAIM_PAUSE_RATIO", 3.0)
    await freed.purge_expired()
    await _free_at_most(freed.path, 0)
    assert len(steps) > 20
    for (start, end), (following, _) in itertools.pairwise(steps):
        assert following - end >= 3.0 * (end - start)


async def test_closing_the_store_stops_giving_pages_back_where_it_stood(
    freed: SQLiteJobStore,
) -> None:
    await freed.purge_expired()
    await freed.close()
    with contextlib.closing(sqlite3.connect(freed.path)) as c:
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert _free_pages(freed.path) > 0


async def test_a_purge_that_cannot_give_pages_back_says_so_and_does_not_fail(
    freed: SQLiteJobStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(c: sqlite3.Connection) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(upkeep, "reclaim_step", full)
    with caplog.at_level(logging.WARNING, logger="tandem.jobs"):
        assert await freed.purge_expired() == 0
        await _logged(caplog, "database or disk is full, giving pages back")


async def test_a_file_of_an_earlier_version_is_kept_and_says_how_to_make_it_shrink(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jobs.db"
    with contextlib.closing(sqlite3.connect(path)) as c:
        c.executescript(schema.SCHEMA)  # made with auto_vacuum off, as before
    store = SQLiteJobStore(path)
    with caplog.at_level(logging.INFO, logger="tandem.jobs"):
        await store.open()
    try:
        assert "does not shrink" in caplog.text
        assert 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;"' in caplog.text
        await _finished_megabytes(store, 1)
        free = _free_pages(path)
        await store.purge_expired()  # nothing to give back, and no fault
        assert _free_pages(path) == free > 0
    finally:
        await store.close()
    # As the log line says, the file can be converted while nothing has it open.
    with contextlib.closing(sqlite3.connect(path)) as c:
        c.executescript("PRAGMA auto_vacuum=INCREMENTAL; VACUUM;")
    caplog.clear()
    store = SQLiteJobStore(path)
    with caplog.at_level(logging.INFO, logger="tandem.jobs"):
        await store.open()
    await store.close()
    assert "does not shrink" not in caplog.text


@pytest.mark.parametrize(
    ("statement", "arguments"),
    [
        (sqlite_store.CLAIMABLE_QUEUED, (JobStatus.QUEUED, 4)),
        (sqlite_store.CLAIMABLE_EXPIRED, (JobStatus.RUNNING, 0.0, 4)),
    ],
)
async def test_a_claim_reads_the_queue_in_index_order_and_sorts_none_of_it(
    tmp_path: Path, statement: str, arguments: tuple[object, ...]
) -> None:
    """A claim takes a few of the oldest jobs: sorting every queued one to find them cost
    0.9 ms at 10,000 queued, on the store's thread, for every batch."""
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    await store.close()
    with sqlite3.connect(store.path) as c:
        plan = " ".join(row[3] for row in c.execute(f"EXPLAIN QUERY PLAN {statement}", arguments))
    assert "jobs_claimable" in plan
    assert "TEMP B-TREE" not in plan


async def test_a_full_disk_refuses_the_job_saying_so_and_the_store_recovers(
    tmp_path: Path,
) -> None:
    """SQLite rolls back a transaction that hit a full disk itself: the store's ROLLBACK then
    raised "no transaction is active", which hid the reason."""
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        conn = store._conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 8}")  # the file cannot grow: a full disk
        big = JobSpec(id=new_job_id(), image=os.urandom(200_000))
        with pytest.raises(DiskLow, match="database or disk is full"):
            await store.enqueue(big)
        assert await store.get(big.id) is None
        assert await store.queue_depth() == 0
        conn.execute("PRAGMA max_page_count = 1073741823")  # room again
        assert (await store.enqueue(big)).status is JobStatus.QUEUED
    finally:
        await store.close()


async def test_after_a_full_disk_the_store_says_so_until_the_refused_job_would_fit(
    small_disk: Path,
) -> None:
    """With no floor set, the ping's small write went on passing on a disk too full for any
    job: /health/all said ok while every new job was refused."""
    store = SQLiteJobStore(small_disk / "jobs.db")  # min_free_bytes 0: no floor
    await store.open()
    try:
        small = JobSpec(id=new_job_id(), image=b"small", idempotency_key="k1")
        await store.enqueue(small)
        filler = fill(small_disk, leaving=64 * 1024)
        big = JobSpec(id=new_job_id(), image=os.urandom(512 * 1024))
        with pytest.raises(DiskLow, match="database or disk is full") as refused:
            await store.enqueue(big)
        assert refused.value.details["needed_bytes"] == 2 * len(big.image)
        assert await _room(store) == 0
        with pytest.raises(DiskLow, match="the job store's disk was full"):
            await store.ping()
        retried = JobSpec(id=new_job_id(), image=b"small", idempotency_key="k1")
        assert (await store.enqueue(retried)).id == small.id  # writes nothing, proves no room
        with pytest.raises(DiskLow, match="the job store's disk was full"):
            await store.ping()
        with pytest.raises(DiskLow, match="the last job refused needs 1024 KiB"):
            await store.enqueue(JobSpec(id=new_job_id(), image=b"small"))
        filler.unlink()
        await store.ping()
        assert (await store.enqueue(big)).status is JobStatus.QUEUED
        assert await store.queue_depth() == 2
    finally:
        await store.close()


async def test_the_room_the_store_reports_is_what_it_may_take_before_it_refuses_jobs(
    small_disk: Path,
) -> None:
    """tandem_store_room_bytes: free disk above the floor, 0 while new jobs are refused."""
    floor = MIB
    store = SQLiteJobStore(small_disk / "jobs.db", min_free_bytes=floor)
    await store.open()
    try:
        empty = await _room(store)
        assert 2 * MIB < empty <= shutil.disk_usage(small_disk).free - floor  # 4 MiB disk
        await store.enqueue(JobSpec(id=new_job_id(), image=os.urandom(MIB)))
        assert await _room(store) <= empty - MIB // 2  # its WAL may reuse a little room
        filler = fill(small_disk, leaving=floor // 2)
        assert await _room(store) == 0
        with pytest.raises(DiskLow, match="under its floor"):
            await store.enqueue(JobSpec(id=new_job_id(), image=b"small"))
        filler.unlink()
        assert await _room(store) > MIB
        await store.enqueue(JobSpec(id=new_job_id(), image=b"small"))
    finally:
        await store.close()


async def _room(store: SQLiteJobStore) -> float:
    return (await store.space()).room_bytes


async def test_under_its_disk_floor_the_store_takes_no_new_job_but_finishes_queued_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    queued = JobSpec(id=new_job_id(), image=b"queued before", idempotency_key="k1")
    roomy = SQLiteJobStore(path, min_free_bytes=1)  # any disk has a byte free
    await roomy.open()
    await roomy.enqueue(queued)
    await roomy.ping()
    await roomy.close()
    floor = shutil.disk_usage(tmp_path).free + 1024 * MIB
    store = SQLiteJobStore(path, min_free_bytes=floor)
    await store.open()
    try:
        with pytest.raises(DiskLow, match=f"under its floor of {floor // MIB} MiB") as refused:
            await store.enqueue(JobSpec(id=new_job_id(), image=b"new"))
        assert refused.value.details["min_free_bytes"] == floor
        assert 0 <= refused.value.details["free_bytes"] < floor
        assert await store.queue_depth() == 1
        retried = JobSpec(id=new_job_id(), image=b"queued before", idempotency_key="k1")
        assert (await store.enqueue(retried)).id == queued.id  # a retry writes nothing
        [claim] = await store.claim("w", 4, 0)
        assert await store.complete(claim.job.id, ANSWER)
        with pytest.raises(DiskLow):
            await store.ping()
    finally:
        await store.close()


async def test_room_that_finished_jobs_freed_in_the_file_counts_under_the_floor(
    tmp_path: Path,
) -> None:
    """The file never shrinks: judged by the file system alone, a store that once came near
    its floor refused every job after, though finished jobs had freed their images' pages."""
    path = tmp_path / "jobs.db"
    done = SQLiteJobStore(path)
    await done.open()
    big = JobSpec(id=new_job_id(), image=os.urandom(8 * MIB))
    await done.enqueue(big)
    await done.claim("w", 1, 0)
    await done.complete(big.id, ANSWER)
    await done.close()  # its WAL checkpointed: the file system's free space stays put
    free = shutil.disk_usage(tmp_path).free
    store = SQLiteJobStore(path, min_free_bytes=free + 4 * MIB)
    await store.open()
    try:
        small = JobSpec(id=new_job_id(), image=b"small")
        assert (await store.enqueue(small)).status is JobStatus.QUEUED
        store.min_free_bytes = free + 12 * MIB
        with pytest.raises(DiskLow):
            await store.enqueue(JobSpec(id=new_job_id(), image=b"small"))
    finally:
        await store.close()


async def test_a_store_that_takes_no_writes_fails_its_ping(tmp_path: Path) -> None:
    """The ping was a read: a file that no longer took writes (a full disk, a file system
    remounted read-only) passed it while every enqueue failed."""
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        await store.ping()
        conn = store._conn
        assert conn is not None
        conn.execute("PRAGMA query_only = ON")  # SQLite's own read-only state
        with pytest.raises(QueueUnavailable, match="readonly database"):
            await store.ping()
        conn.execute("PRAGMA query_only = OFF")
        await store.ping()
    finally:
        await store.close()


async def test_watchers_hear_of_another_process_writes_after_a_fault_in_looking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The look for other processes' writes runs in a task nobody awaits: an error it did not
    foresee (a damaged file) ended it, and watchers heard of no other process again."""
    path = tmp_path / "jobs.db"
    proxy, worker = SQLiteJobStore(path), SQLiteJobStore(path)  # two connections, as two processes
    await proxy.open()
    await worker.open()
    try:
        job = await proxy.enqueue(JobSpec(id=new_job_id(), image=b"image"))
        look, faults = proxy._others._look, [sqlite3.DatabaseError("disk image is malformed")]

        async def faulty() -> int:
            if faults:
                raise faults.pop()
            return await look()

        proxy._others._look = faulty
        await asyncio.sleep(2 * sqlite_store.RECHECK_S)  # the fault has come and gone
        assert not faults
        async with proxy.watch(job.id) as watch:
            await worker.claim("w", 1, 0)
            await worker.complete(job.id, ANSWER)
            started = time.monotonic()
            await watch.wait(timeout=10)
            assert time.monotonic() - started < 5 * sqlite_store.RECHECK_S
        assert "looking for other processes' writes failed" in caplog.text
    finally:
        await proxy.close()
        await worker.close()


async def test_a_file_that_is_no_database_is_refused_at_open_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    path.write_bytes(b"\x89PNG\r\n" + os.urandom(8192))
    store = SQLiteJobStore(path)
    with pytest.raises(ConfigurationError, match="cannot be opened: file is not a database"):
        await store.open()
    await store.close()


async def test_the_stored_images_are_readable_by_this_user_alone(tmp_path: Path) -> None:
    """Made with the usual umask, the database and its WAL, which hold the photos people
    sent, were readable by every user of the machine."""
    previous = os.umask(0o022)
    try:
        store = SQLiteJobStore(tmp_path / "data" / "jobs.db")
        await store.open()
        await store.enqueue(JobSpec(id=new_job_id(), image=os.urandom(10_000)))
        modes = {
            path.name: path.stat().st_mode & 0o777
            for path in [tmp_path / "data", *sorted((tmp_path / "data").iterdir())]
        }
        await store.close()
    finally:
        os.umask(previous)
    assert modes == {"data": 0o700, "jobs.db": 0o600, "jobs.db-shm": 0o600, "jobs.db-wal": 0o600}


async def test_a_database_others_may_read_is_kept_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jobs.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)  # as an earlier version made it
    store = SQLiteJobStore(path)
    with caplog.at_level(logging.WARNING, logger="tandem.files"):
        await store.open()
    await store.close()
    assert path.stat().st_mode & 0o777 == 0o644  # the operator's to change
    (record,) = caplog.records
    assert "(mode 644): chmod 600 it" in record.getMessage()


async def test_a_lazy_write_leaves_the_connection_durable(tmp_path: Path) -> None:
    """The fast answer's write skips its fsync on the one connection every write shares:
    the job written next must be durable again (synchronous FULL, 2)."""
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        job = await store.enqueue(JobSpec(id=new_job_id(), image=b"image"))
        await store.attach_fast(job.id, ANSWER)
        conn = store._conn
        assert conn is not None
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        await store.close()
