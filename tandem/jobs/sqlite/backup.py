"""Copies of the SQLite store: taken while it serves, and put back while nothing has it open.

SQLite's online backup (the shell's `.backup`) copies a hundred pages a step and starts over
whenever another process commits between two steps: beside a process committing every 6 ms,
a 200 MB store's copy had not finished after 50 s. `VACUUM INTO` copies within one read
transaction, which in WAL mode holds no writer up: the same copy took 0.4 s.

A copy put back over a store that a process still has open would be overwritten by that
process's next checkpoint, and a log left beside it would be applied to it: `restore` refuses
the one and removes the other.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import CopyFailed
from tandem.files import PRIVATE_FILE, private_dir
from tandem.jobs.sqlite.upkeep import BUSY_TIMEOUT_MS, MIB, beside, store_bytes

SQLITE_HEADER = b"SQLite format 3\0"  # the first bytes of every SQLite database file


def back_up(path: Path, dest: Path, keep_free_bytes: int = 0) -> int:
    """Copy the store at `path` to `dest`, a new file, as one moment of the store left it;
    its size in bytes. The copy holds the queued jobs' images: it is this user's alone. On
    the store's own disk it leaves `keep_free_bytes` free, as the store's writes do."""
    if not path.is_file():
        raise CopyFailed(f"there is no job store at {path}")
    if dest.exists():
        raise CopyFailed(f"{dest} exists already; name a new file")
    _check_room(path, dest, keep_free_bytes if _same_disk(path, dest.parent) else 0)
    with _partial(dest) as partial:
        _vacuum_into(path, partial)
        _sync(partial)
        partial.replace(dest)
        _sync(dest.parent)
    return dest.stat().st_size


@dataclass(frozen=True, slots=True)
class Restored:
    size: int  # bytes
    replaced: Path | None  # where the store it replaced is kept; None: there was none


def restore(copy: Path, path: Path, keep_free_bytes: int = 0) -> Restored:
    """Put `copy` (one `back_up` made) in place as the store at `path`, which no process may
    have open meanwhile. The store it replaces, if any, is kept beside it, whole (its log
    moved into it), as `<name>.replaced-<UTC time>`."""
    if not copy.is_file():
        raise CopyFailed(f"there is no copy at {copy}")
    if path.exists() and copy.resolve() == path.resolve():
        raise CopyFailed(f"{copy} is the job store itself; name a copy of it")
    private_dir(path.parent)
    _check_room(copy, path, keep_free_bytes)
    with _partial(path) as partial:
        _vacuum_into(copy, partial)
        _check_store(partial, copy)
        _sync(partial)
        with _held(path):
            replaced = _keep_aside(path)
            partial.replace(path)
            _sync(path.parent)
    return Restored(path.stat().st_size, replaced)


@contextlib.contextmanager
def _partial(dest: Path) -> Iterator[Path]:
    """A new file for this user alone, beside `dest`, to be renamed there once synced: a copy
    cut short (a full disk, a crash) never takes its name. Gone afterwards if not renamed."""
    partial = dest.with_name(f".{dest.name}.partial")
    partial.unlink(missing_ok=True)  # left by an earlier copy cut short
    try:
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE))
        yield partial
    except OSError as exc:
        raise CopyFailed(f"the copy to {dest} failed: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """Hold the store at `path` so that no process opens it meanwhile, refusing one that a
    process has open; its log is moved into it first, and removed.

    In WAL mode every connection keeps a shared lock on the file for as long as it is open, so
    SQLite's own exclusive lock is refused while a server, a worker or a backup has it. A file
    that is not SQLite's no process can be serving: it is left as it is, since SQLite, closing
    such a file, deletes the log beside it."""
    if not path.exists():
        log = beside(path, "-wal")
        if log.exists():  # SQLite would apply it to the restored store
            raise CopyFailed(f"{log} lies there without its store: move it away first")
        yield
        return
    if not _is_sqlite(path):
        yield
        return
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        _lock(conn, path)
        yield
    finally:
        conn.close()


def _lock(conn: sqlite3.Connection, path: Path) -> None:
    """Take the store out of WAL mode, which moves the log into the file and deletes it, and
    keep the exclusive lock that takes. Pages damaged in the file do not stop it."""
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        [(mode,)] = conn.execute("PRAGMA journal_mode=DELETE").fetchall()
    except sqlite3.OperationalError as exc:  # "database is locked"
        raise _in_use(path, str(exc)) from exc
    except sqlite3.DatabaseError as exc:
        raise CopyFailed(f"the job store {path} cannot be opened ({exc}): move it away") from exc
    if mode != "delete":
        raise _in_use(path, f"its journal mode stayed {mode}")


def _in_use(path: Path, why: str) -> CopyFailed:
    return CopyFailed(
        f"the job store {path} is in use ({why}): first stop the tandem serve, tandem worker "
        "or backup that has it open"
    )


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def _keep_aside(path: Path) -> Path | None:
    """Link the store at `path` to a name of its own, so that `path` never lacks a store. A log
    still beside it (a damaged store's, which SQLite could not move into it) goes with it,
    since SQLite would apply it to the store put in its place."""
    beside(path, "-shm").unlink(missing_ok=True)  # rebuilt from the log by the next opener
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = _link_aside(path, f"{path.name}.replaced-{stamp}")
    log = beside(path, "-wal")
    if log.exists():
        log.replace(beside(kept, "-wal"))
    return kept


def _link_aside(path: Path, name: str) -> Path:
    """A hard link to `path` under `name`, or `name-2`, `name-3`... if taken (a second restore
    within the same second): one kept store never takes another's place."""
    for n in itertools.count(1):
        kept = path.with_name(name if n == 1 else f"{name}-{n}")
        with contextlib.suppress(FileExistsError):
            os.link(path, kept)
            return kept
    raise AssertionError("unreachable")


def _same_disk(path: Path, directory: Path) -> bool:
    try:
        return directory.stat().st_dev == path.stat().st_dev
    except OSError as exc:
        raise CopyFailed(f"the copy to {directory} failed: {exc}") from exc


def _check_room(source: Path, dest: Path, keep_free_bytes: int) -> None:
    """Refuse a copy that may not fit, leaving `keep_free_bytes` free: one that filled the
    store's disk would stop the store's writes too, the workers' included. A copy is at most
    the file and its log."""
    needed = store_bytes(source)
    try:
        free = shutil.disk_usage(dest.parent).free
    except OSError as exc:
        raise CopyFailed(f"the copy to {dest} failed: {exc}") from exc
    spare = free - keep_free_bytes
    if needed > spare:
        floor = " above TANDEM_MIN_FREE_DISK_MB" if keep_free_bytes else ""
        raise CopyFailed(
            f"the copy needs up to {needed / MIB:.0f} MiB, and {dest.parent} has "
            f"{max(spare, 0) / MIB:.0f} MiB free{floor}"
        )


def _vacuum_into(path: Path, target: Path) -> None:
    # Read-only: taking a copy must never write to the store.
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as c:
        c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            c.execute("VACUUM INTO ?", (str(target),))
        except sqlite3.Error as exc:
            raise CopyFailed(f"{path} could not be copied: {exc}") from exc


def _check_store(path: Path, copy: Path) -> None:
    """Refuse a copy (of `copy`, at `path`) that is not a whole job store; make it a WAL file,
    as the store is."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        [(verdict,)] = c.execute("PRAGMA quick_check(1)").fetchall()
        if verdict != "ok":
            raise CopyFailed(f"{copy} is damaged: {verdict}")
        if not c.execute("SELECT 1 FROM sqlite_schema WHERE name = 'jobs'").fetchone():
            raise CopyFailed(f"{copy} is a database but not a job store")
        c.execute("PRAGMA journal_mode=WAL")


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
