"""How the job file is kept: its connections' settings, the WAL moved into the database file
and started over, and the pages that finished jobs free given back to the file system."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from tandem.errors import QueueUnavailable
from tandem.tasks import stop
from tandem.threads import pool

log = logging.getLogger("tandem.jobs")

KIB = 1024
MIB = 1024 * KIB
BUSY_TIMEOUT_MS = 10_000

CHECKPOINT_EVERY_S = 1.0
# The checkpoint copies megabytes a second beside the fast model: it gets the cores last.
CHECKPOINT_NICE = 19
# Beside other processes keeping the cores busy at nice 0, a checkpoint at nice 19 gets some
# 1 % of a core, and under commits that never pause the WAL grew past its cap for as long as
# that one took. Once one has, checkpoints run at the process's priority for this long (see
# Checkpointer._in_time).
HURRIED_FOR_S = 60.0
INTERRUPT_EVERY_S = 0.01
# The WAL is started over past this, and its file cut back to it: the file keeps the size
# its busiest spell gave it (1 GB after a backlog of 470 MB). Starting over costs the store's
# thread 35 to 40 ms (see start_wal_over); at 64 MiB, that raised the 16-client p99 by 7 and
# 17 % in an A/B, at 256 MiB by nothing that A/B runs could tell from noise.
WAL_KEPT_BYTES = 256 * MIB
WAL_FRAME_HEADER_BYTES = 24
START_OVER_WAIT_MS = 50
# The WAL's file keeps the disk its busiest spell took (up to WAL_KEPT_BYTES), and had kept
# it for good. Every WAL_WINDOW_S, a file over WAL_SLACK_BYTES and WAL_OVERSIZE times what the
# window's commits wrote between two checkpoints is emptied and cut to nothing. Idle or under
# a trickle of jobs that is soon after a backlog; under a steady load, once a minute at most.
WAL_WINDOW_S = 60.0
WAL_SLACK_BYTES = 16 * MIB
WAL_OVERSIZE = 4
# A try that a reader held off (a backup, say) is tried again after twice the wait before it,
# up to this: each holds the store's thread up for START_OVER_WAIT_MS.
START_OVER_BACKOFF_MAX_S = 30.0

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


# -- connections ------------------------------------------------------------------------------


def beside(path: Path, suffix: str) -> Path:
    """A file SQLite keeps beside the database at `path`: its `-wal`, its `-shm`."""
    return path.with_name(path.name + suffix)


def size_on_disk(path: Path) -> int:
    """The size of the database, or of a file beside it (0 where there is none: the last
    connection to close removes its WAL)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def store_bytes(path: Path) -> int:
    """The database at `path` and its WAL, on disk."""
    return size_on_disk(path) + size_on_disk(beside(path, "-wal"))


def connection(path: Path) -> sqlite3.Connection:
    """A connection with the settings each of the store's takes, its checkpointer's too."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # No checkpoint inside a commit: the one that crossed 1000 pages of WAL (about every 26th
    # enqueue of a 136 KB photo) waited some 20 ms for it, and set the 1-client p99.
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(f"PRAGMA journal_size_limit={WAL_KEPT_BYTES}")
    return conn


@contextlib.contextmanager
def lazily(conn: sqlite3.Connection) -> Iterator[None]:
    """Commits skip their fsync meanwhile. The setting is per connection, and one connection
    makes every write of this process, lazy or not, so that none moves its data_version."""
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        conn.execute("PRAGMA synchronous=FULL")


# -- the WAL ----------------------------------------------------------------------------------


WalStep = Callable[[sqlite3.Connection], bool]


class Checkpointer:
    """Moves the WAL into the database file every `every_s`, on a thread and connection of
    its own. A PASSIVE checkpoint waits for no reader or writer: commits go on meanwhile.

    The next commit after a checkpoint that copied the whole WAL writes it from its start.
    Under commits that never pause, none does, and the WAL grew for as long as they came (11 MB
    a second at a proxy's 160 requests/s): past WAL_KEPT_BYTES, it is started over
    (`start_wal_over`). A file far larger than the commits need is emptied (`empty_wal`; see
    WAL_WINDOW_S). Both run by `run`, on the store's thread and connection, since they take
    the write lock. Where the checkpoint starves at CHECKPOINT_NICE, the WAL's cap still holds
    (`_in_time`)."""

    def __init__(
        self, path: Path, every_s: float, run: Callable[[WalStep], Awaitable[bool]]
    ) -> None:
        self._path, self._every_s, self._run = path, every_s, run
        self._wal = beside(path, "-wal")
        self._thread = pool("tandem-checkpoint", 1, CHECKPOINT_NICE)
        self._urgent = pool("tandem-checkpoint-urgent", 1)  # its thread starts when first used
        self._conn: sqlite3.Connection | None = None
        # A WAL frame is a page and its header; the page size of a file in WAL mode is fixed.
        self._frame_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self._backoff_s, self._start_over_at = 0.0, 0.0
        # The WAL's length at the last checkpoint, and whether it was started over since: until
        # a commit, it need not be again. The most the window's commits wrote between
        # checkpoints, and the window's start.
        self._wal_bytes, self._started_over = 0, False
        self._written, self._window_start = 0, time.monotonic()
        self._hurried_until = 0.0
        self._slow: asyncio.Future[tuple[int, int]] | None = None  # the last at CHECKPOINT_NICE

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._thread, connection, self._path)
        page_bytes = await loop.run_in_executor(self._thread, page_size, self._conn)
        self._frame_bytes = page_bytes + WAL_FRAME_HEADER_BYTES
        self._task = asyncio.create_task(self._every_while(), name="tandem-checkpoint")

    async def _every_while(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            with contextlib.suppress(sqlite3.Error, QueueUnavailable):  # the next round tries
                await self._tend(*await self._in_time())

    async def _in_time(self) -> tuple[int, int]:
        """A checkpoint's findings. It runs at CHECKPOINT_NICE, unless one there let the WAL
        pass WAL_KEPT_BYTES in the last HURRIED_FOR_S: then at the process's priority. (The
        WAL's file only grows past that when the WAL in use does: starting over cuts it.)"""
        loop = asyncio.get_running_loop()
        if time.monotonic() < self._hurried_until:
            return await loop.run_in_executor(self._urgent, self._checkpoint)
        slow = self._slow = loop.run_in_executor(self._thread, self._checkpoint)
        started = time.monotonic()
        while not slow.done():
            await asyncio.wait([slow], timeout=self._every_s)
            if not slow.done() and self._wal_file_bytes() > WAL_KEPT_BYTES:
                await self._interrupt(slow)
                self._hurry(time.monotonic() - started)
                return await loop.run_in_executor(self._urgent, self._checkpoint)
        return slow.result()

    async def _interrupt(self, slow: asyncio.Future[tuple[int, int]]) -> None:
        """Two checkpoints never run at once: `slow` gives up at its next page. An interrupt
        that came before it started is forgotten, hence again until it gives up."""
        assert self._conn is not None
        while not slow.done():
            self._conn.interrupt()
            await asyncio.wait([slow], timeout=INTERRUPT_EVERY_S)
        with contextlib.suppress(sqlite3.Error):  # interrupted, or failed: the next one tries
            slow.result()

    def _hurry(self, waited_s: float) -> None:
        self._hurried_until = time.monotonic() + HURRIED_FOR_S
        log.warning(
            "the job store's WAL passed %d MiB while its checkpoint, at nice %d, waited %.1f s"
            " for busy cores: checkpoints run at the process's priority for the next %.0f s",
            WAL_KEPT_BYTES // MIB,
            CHECKPOINT_NICE,
            waited_s,
            HURRIED_FOR_S,
        )

    async def _tend(self, wal_bytes: int, file_bytes: int) -> None:
        """Start the WAL over, or empty it, if it needs it and no try is waiting its turn."""
        step = self._step_for(wal_bytes, file_bytes)
        if step is None or time.monotonic() < self._start_over_at:
            return
        self._started_over = await self._run(step)
        self._tried_start_over(self._started_over)
        if step is empty_wal and self._started_over:
            log.info("the job store's WAL gave %d MiB back", file_bytes // MIB)

    def _step_for(self, wal_bytes: int, file_bytes: int) -> WalStep | None:
        """What the WAL needs, if anything, after a checkpoint found `wal_bytes` of it in use
        in a file of `file_bytes`."""
        # A commit moves the WAL's length: it adds to it, or, after a checkpoint that copied
        # it all, writes it from its start. (Alike commits a checkpoint apart leave it as it
        # was, and look like none: WAL_SLACK_BYTES keeps such a store's small file.) The
        # connection's data_version would tell every commit, for a read each round that a
        # commit starting the WAL over must not meet; the length costs nothing.
        if wal_bytes != self._wal_bytes:
            self._wal_bytes, self._started_over = wal_bytes, False
            self._written = max(self._written, wal_bytes)
        if wal_bytes > WAL_KEPT_BYTES and not self._started_over:
            return start_wal_over
        if time.monotonic() - self._window_start < WAL_WINDOW_S:
            return None
        needed = max(WAL_OVERSIZE * self._written, WAL_SLACK_BYTES)
        self._written, self._window_start = 0, time.monotonic()
        return empty_wal if file_bytes > needed else None

    def _tried_start_over(self, done: bool) -> None:
        """Set when to try next: at once after a try that worked, else after twice the wait
        before it. A backup reading for minutes had cost the store's thread 50 ms a second."""
        if done:
            self._backoff_s = 0.0
        else:
            self._backoff_s = min(max(2 * self._backoff_s, self._every_s), START_OVER_BACKOFF_MAX_S)
        self._start_over_at = time.monotonic() + self._backoff_s

    def _checkpoint(self) -> tuple[int, int]:
        """A PASSIVE checkpoint; the bytes of the WAL in use it found, and its file's size."""
        assert self._conn is not None
        [(_, frames, _)] = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return max(int(frames), 0) * self._frame_bytes, self._wal_file_bytes()

    def _wal_file_bytes(self) -> int:
        return size_on_disk(self._wal)

    async def stop(self) -> None:
        """The last connection to close checkpoints what is left (SQLite does that itself), so
        a checkpoint still waiting for the cores at CHECKPOINT_NICE is interrupted."""
        await stop(self._task)
        self._task = None
        if self._slow is not None:
            await self._interrupt(self._slow)
        self._urgent.shutdown(wait=True)  # a checkpoint there may still have the connection
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._conn.close)
            self._conn = None
        self._thread.shutdown(wait=True)


def start_wal_over(c: sqlite3.Connection) -> bool:
    """A RESTART checkpoint, after which the next commit writes the WAL from its start (and cuts
    it back to WAL_KEPT_BYTES). It holds the write lock while it copies what the last PASSIVE
    one left, syncs the database file (35 to 40 ms here while the file grew, however little
    was left) and waits for readers to leave the WAL: on the store's thread, since at
    CHECKPOINT_NICE it would hold the lock while waiting for the cores, and for
    START_OVER_WAIT_MS at most, since a reader such as a backup may take minutes (the next
    round tries again). Whether it did: not while a reader held the WAL."""
    return _wal_checkpoint(c, "RESTART")


def empty_wal(c: sqlite3.Connection) -> bool:
    """As `start_wal_over`, and the WAL's file cut to nothing (a TRUNCATE checkpoint)."""
    return _wal_checkpoint(c, "TRUNCATE")


def _wal_checkpoint(c: sqlite3.Connection, mode: str) -> bool:
    c.execute(f"PRAGMA busy_timeout={START_OVER_WAIT_MS}")
    try:
        [(busy, _, _)] = c.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        return not busy
    finally:
        c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


# -- free pages -------------------------------------------------------------------------------


def shrinks(c: sqlite3.Connection, path: Path) -> bool:
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


def page_size(c: sqlite3.Connection) -> int:
    return int(c.execute("PRAGMA page_size").fetchone()[0])


def free_pages_bytes(c: sqlite3.Connection) -> int:
    pages = c.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages) * page_size(c)


def reclaim_step(c: sqlite3.Connection) -> int:
    """Give back up to RECLAIM_STEP_PAGES free pages beyond KEEP_FREE_BYTES; how many."""
    pages = min((free_pages_bytes(c) - KEEP_FREE_BYTES) // page_size(c), RECLAIM_STEP_PAGES)
    if pages <= 0:
        return 0
    # executescript steps the pragma to its end: execute stops after its first page.
    c.executescript(f"PRAGMA incremental_vacuum({pages})")
    return pages


Step = Callable[[sqlite3.Connection], int]


async def give_back(run: Callable[[Step], Awaitable[int]]) -> None:
    """Give the file system the free pages beyond KEEP_FREE_BYTES, a step at a time, each
    run by `run` (on the store's thread, without an fsync: a crash undoes one step) and
    followed by a pause (see RECLAIM_PAUSE_RATIO)."""
    pages, page_bytes, started = 0, 0, time.monotonic()
    try:
        page_bytes = await run(page_size)
        while True:
            step_started = time.monotonic()
            step = await run(reclaim_step)
            pages += step
            if step < RECLAIM_STEP_PAGES:
                break
            await asyncio.sleep((time.monotonic() - step_started) * RECLAIM_PAUSE_RATIO)
    except QueueUnavailable as exc:  # moving pages writes: a disk near full may refuse it
        log.warning("%s, giving pages back; the next purge tries again", exc)
    finally:
        if pages:
            log.info(
                "the job store gave %d MiB back to the file system in %.0f s",
                pages * page_bytes // MIB,
                time.monotonic() - started,
            )
