"""The job file's tables, and how a file an earlier version made is brought up to date."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tandem.errors import ConfigurationError
from tandem.jobs.records import JobStatus

T = TypeVar("T")

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
    worker      TEXT, -- who holds the lease of a running job
    owner       TEXT  -- the API key id that sent it
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

# The unfinished jobs of each owner, kept the same way, for the owner's share of the queue. An
# owner's row goes when its count does, so the table holds only the keys with jobs in hand.
_ADD_OWNED = (
    "INSERT INTO owners (owner, n) VALUES (new.owner, 1)"
    " ON CONFLICT (owner) DO UPDATE SET n = n + 1;"
)
_REMOVE_OWNED = (
    "UPDATE owners SET n = n - 1 WHERE owner = old.owner;"
    " DELETE FROM owners WHERE owner = old.owner AND n <= 0;"
)
OWNED_COUNT = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS owners_insert AFTER INSERT ON jobs
WHEN new.owner IS NOT NULL AND new.status IN {_UNFINISHED}
BEGIN {_ADD_OWNED} END;
CREATE TRIGGER IF NOT EXISTS owners_delete AFTER DELETE ON jobs
WHEN old.owner IS NOT NULL AND old.status IN {_UNFINISHED}
BEGIN {_REMOVE_OWNED} END;
CREATE TRIGGER IF NOT EXISTS owners_finish AFTER UPDATE OF status ON jobs
WHEN old.owner IS NOT NULL AND old.status IN {_UNFINISHED} AND new.status NOT IN {_UNFINISHED}
BEGIN {_REMOVE_OWNED} END;
CREATE TRIGGER IF NOT EXISTS owners_requeue AFTER UPDATE OF status ON jobs
WHEN new.owner IS NOT NULL AND new.status IN {_UNFINISHED} AND old.status NOT IN {_UNFINISHED}
BEGIN {_ADD_OWNED} END;
INSERT OR IGNORE INTO owners (owner, n)
SELECT owner, COUNT(*) FROM jobs WHERE owner IS NOT NULL AND status IN {_UNFINISHED} GROUP BY owner;
COMMIT;
"""  # noqa: S608 (built from JobStatus, not from input)


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


def create(c: sqlite3.Connection) -> None:
    """Make the tables a new file lacks, and bring an older file's up to date."""
    c.executescript(SCHEMA)
    migrate(c)
    c.executescript(UNFINISHED_COUNT)
    c.executescript(OWNED_COUNT)


def migrate(c: sqlite3.Connection) -> None:
    """Bring a job file an earlier version made to this version's layout."""
    columns = {row[1] for row in c.execute("PRAGMA table_info(jobs)")}
    if "webhook" not in columns:
        c.execute("ALTER TABLE jobs ADD COLUMN webhook TEXT")
    if "worker" not in columns:
        c.execute("ALTER TABLE jobs ADD COLUMN worker TEXT")
    if "owner" not in columns:
        c.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
    if "image" in columns:  # images lived in the jobs table before they had their own
        in_transaction(c, lambda: _move_images(c))


def _move_images(c: sqlite3.Connection) -> None:
    if "image" not in {row[1] for row in c.execute("PRAGMA table_info(jobs)")}:
        return  # another process opening the same file moved them first
    c.execute(
        "INSERT OR IGNORE INTO images (job_id, data)"
        " SELECT id, image FROM jobs WHERE image IS NOT NULL"
    )
    c.execute("ALTER TABLE jobs DROP COLUMN image")


def in_transaction(c: sqlite3.Connection, body: Callable[[], T]) -> T:
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
