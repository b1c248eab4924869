"""`tandem backup` and `tandem restore`: a copy of the SQLite store taken while it serves, and
put back while nothing has it open."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tandem.cli import EXIT_CONFIG, EXIT_FAILED, main
from tandem.errors import CopyFailed
from tandem.jobs.factory import DB_NAME
from tandem.jobs.records import JobSpec, JobStatus, new_job_id
from tandem.jobs.sqlite import MIB, SQLiteJobStore, upkeep
from tandem.jobs.sqlite.backup import back_up, restore
from tests.support import ANSWER


async def _store_with_jobs(
    path: Path, jobs: int = 12
) -> tuple[SQLiteJobStore, dict[str, bytes], set[str]]:
    """A store holding queued jobs (their ids and images) and done ones (their ids)."""
    store = SQLiteJobStore(path)
    await store.open()
    images = {new_job_id(): os.urandom(100_000) for _ in range(jobs)}
    for job_id, image in images.items():
        await store.enqueue(JobSpec(id=job_id, image=image))
    claims = await store.claim("w", 4, 0)
    await store.complete_many({claim.id: ANSWER for claim in claims})
    done = {claim.id for claim in claims}
    return store, {k: v for k, v in images.items() if k not in done}, done


def _closed_store(path: Path) -> Path:
    async def make() -> None:
        store, _, _ = await _store_with_jobs(path)
        await store.close()

    asyncio.run(make())
    return path


async def test_a_copy_taken_while_jobs_are_stored_holds_the_store_as_it_was(
    tmp_path: Path,
) -> None:
    """SQLite's step-wise online backup starts over at every commit of another connection:
    copying this store a hundred pages a step beside these enqueues, it had not finished
    after 30 s."""
    store, queued, done = await _store_with_jobs(tmp_path / DB_NAME, jobs=300)
    stop = asyncio.Event()

    async def keep_enqueuing() -> int:
        n = 0
        while not stop.is_set():
            await store.enqueue(JobSpec(id=new_job_id(), image=os.urandom(20_000)))
            n += 1
        return n

    writer = asyncio.create_task(keep_enqueuing())
    await asyncio.sleep(0.05)
    try:
        copy = tmp_path / "copy" / DB_NAME
        copy.parent.mkdir()
        size = await asyncio.to_thread(back_up, store.path, copy)
    finally:
        stop.set()
        written_meanwhile = await writer
        await store.close()
    assert written_meanwhile > 0
    assert size == copy.stat().st_size
    assert copy.stat().st_mode & 0o777 == 0o600  # it holds the queued jobs' images
    assert not list(copy.parent.glob(".*partial"))

    restored = SQLiteJobStore(copy)
    await restored.open()
    try:
        for job_id in done:
            job = await restored.get(job_id)
            assert job is not None
            assert job.status is JobStatus.DONE
        claims = await restored.claim("w", 10_000, 0)
        claimed = {claim.id: claim.image for claim in claims}
        assert claimed.items() >= queued.items()  # every queued job, its image intact
    finally:
        await restored.close()
    with sqlite3.connect(copy) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # Restored, it still gives finished jobs' pages back.
        assert c.execute("PRAGMA auto_vacuum").fetchone() == (upkeep.INCREMENTAL,)


def test_a_copy_never_replaces_a_file(tmp_path: Path) -> None:
    store = _closed_store(tmp_path / DB_NAME)
    dest = tmp_path / "kept.db"
    dest.write_bytes(b"an earlier copy")
    with pytest.raises(CopyFailed, match="exists already"):
        back_up(store, dest)
    assert dest.read_bytes() == b"an earlier copy"


def test_a_copy_that_may_not_fit_is_refused_before_it_begins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filling the store's disk would stop its writes, the workers' included."""
    store = _closed_store(tmp_path / DB_NAME)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CopyFailed, match="above TANDEM_MIN_FREE_DISK_MB"):
        back_up(store, tmp_path / "copy.db", keep_free_bytes=free)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(free=MIB))
    with pytest.raises(CopyFailed, match=r"needs up to 1 MiB, and .* has 1 MiB free$"):
        back_up(store, tmp_path / "copy.db")
    assert not list(tmp_path.glob("*copy*"))


def test_a_copy_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(CopyFailed, match="no job store"):
        back_up(tmp_path / DB_NAME, tmp_path / "copy.db")
    not_sqlite = tmp_path / "other" / DB_NAME
    not_sqlite.parent.mkdir()
    not_sqlite.write_bytes(b"not a database" * 100)
    with pytest.raises(CopyFailed, match="could not be copied"):
        back_up(not_sqlite, tmp_path / "copy.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_the_command_sends_a_redis_user_to_redis_s_tools(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("TANDEM_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["backup", str(tmp_path / "copy.db")]) == EXIT_CONFIG
    assert "Redis's own tools" in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "copy.db")]) == EXIT_CONFIG
    assert "Redis's own files" in capsys.readouterr().err


# -- restore ----------------------------------------------------------------------------------


def _left_with_its_log(path: Path, counter: str) -> None:
    """Commit a row to the store at `path` from a process that then dies, leaving the row in
    the store's log alone, as a crashed server leaves its last jobs."""
    code = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA wal_autocheckpoint=0')\n"
        "c.execute('INSERT INTO counters (name, value) VALUES (?, 1)', (sys.argv[2],))\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), counter], check=True)
    assert path.with_name(f"{path.name}-wal").stat().st_size > 0


def _counters(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as c:
        return {name for (name,) in c.execute("SELECT name FROM counters")}


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _a_copy(directory: Path) -> Path:
    """A copy of a store holding jobs, as `tandem backup` makes it."""
    copy = directory / "copy.db"
    back_up(_closed_store(directory / "source" / DB_NAME), copy)
    return copy


def _job_ids(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as c:
        return {job_id for (job_id,) in c.execute("SELECT id FROM jobs")}


async def test_a_restore_puts_the_copy_in_place_and_keeps_the_store_it_replaced(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data" / DB_NAME
    store, queued, done = await _store_with_jobs(path)
    running = await store.claim("w", 1, 0)  # running when the copy is taken
    copy = tmp_path / "copy.db"
    back_up(path, copy)
    later = await store.enqueue(JobSpec(id=new_job_id(), image=b"after the copy"))
    await store.close()
    _left_with_its_log(path, "after_the_copy")

    restored = restore(copy, path)

    assert restored.size == path.stat().st_size
    assert restored.replaced is not None
    assert restored.replaced.name.startswith(f"{DB_NAME}.replaced-")
    # No log beside the new store: SQLite would have applied the old store's to it.
    assert _names(path.parent) == sorted([DB_NAME, restored.replaced.name])
    assert path.stat().st_mode & 0o777 == 0o600
    # The store it replaced is whole in its one file, its log's last commit included.
    assert "after_the_copy" in _counters(restored.replaced)
    assert "after_the_copy" not in _counters(path)

    # The restored store is the copy: the job stored after it is not there, and the job that
    # was running runs again once its lease has run out.
    far_on = time.time() + 3600  # past the lease, within the results' time to live
    again = SQLiteJobStore(path, clock=lambda: far_on)
    await again.open()
    try:
        assert await again.get(later.id) is None
        claims = {claim.id: claim.image for claim in await again.claim("w2", 100, 0)}
        assert running[0].id in claims
        assert claims.items() >= queued.items()  # their images intact
        for job_id in done:
            job = await again.get(job_id)
            assert job is not None
            assert job.status is JobStatus.DONE
    finally:
        await again.close()


async def test_restores_within_one_second_keep_every_store_they_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept store is named to the second: a second restore within it failed on the link
    ("File exists"), after its copy had been made."""
    path = tmp_path / "data" / DB_NAME
    store, _, _ = await _store_with_jobs(path)
    await store.close()
    copy = tmp_path / "copy.db"
    back_up(path, copy)
    one_second = time.gmtime()
    monkeypatch.setattr(time, "gmtime", lambda *_: one_second)
    kept = [restore(copy, path).replaced for _ in range(3)]
    assert [p.name if p else None for p in kept] == [
        f"{DB_NAME}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', one_second)}{suffix}"
        for suffix in ("", "-2", "-3")
    ]
    assert _names(path.parent) == sorted([DB_NAME, *(p.name for p in kept if p)])


async def test_a_store_in_use_is_not_replaced(tmp_path: Path) -> None:
    """Refused while another process has it open: that process's next checkpoint would write
    its log over the copy put in place."""
    copy = await asyncio.to_thread(_a_copy, tmp_path)
    path = tmp_path / DB_NAME
    store = SQLiteJobStore(path)
    await store.open()
    try:
        kept = await store.enqueue(JobSpec(id=new_job_id(), image=b"still served"))
        before = _names(tmp_path)
        command = [sys.executable, "-m", "tandem", "restore", "--data-dir", str(tmp_path)]
        result = await asyncio.to_thread(
            subprocess.run,
            [*command, str(copy)],
            capture_output=True,
            text=True,
            env={**os.environ, "TANDEM_REDIS_URL": ""},
            check=False,
        )
        assert result.returncode == EXIT_FAILED, result.stderr
        assert "is in use" in result.stderr
        assert _names(tmp_path) == before
        assert await store.get(kept.id) is not None  # still served, from the same file
        await store.enqueue(JobSpec(id=new_job_id(), image=b"and taking jobs"))
    finally:
        await store.close()


def test_a_copy_that_is_not_a_whole_job_store_is_refused(tmp_path: Path) -> None:
    path = _closed_store(tmp_path / "data" / DB_NAME)
    stored = path.read_bytes()
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_bytes(b"not a database" * 100)
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as c:
        c.execute("CREATE TABLE photos (data BLOB)")
    for copy, reason in (
        (not_sqlite, "could not be copied"),
        (other, "not a job store"),
        (tmp_path / "missing.db", "no copy at"),
        (path, "the job store itself"),
    ):
        with pytest.raises(CopyFailed, match=reason):
            restore(copy, path)
        assert _names(path.parent) == [DB_NAME]
        assert path.read_bytes() == stored


def test_a_damaged_store_is_replaced_and_kept_whole(tmp_path: Path) -> None:
    """Damage is when a restore is wanted. Pages overwritten: its log is moved into it, as for
    any store. Not SQLite's at all: it is kept as it is, its log beside it."""
    copy = _a_copy(tmp_path)
    damaged = _closed_store(tmp_path / "damaged" / DB_NAME)
    _left_with_its_log(damaged, "after_the_damage")
    with damaged.open("r+b") as file:
        file.seek(20 * 4096)
        file.write(b"\xff" * 8 * 4096)

    restored = restore(copy, damaged)

    assert restored.replaced is not None
    assert _names(damaged.parent) == sorted([DB_NAME, restored.replaced.name])
    assert "after_the_damage" in _counters(restored.replaced)
    assert _job_ids(damaged) == _job_ids(copy)

    garbage = tmp_path / "garbage" / DB_NAME
    garbage.parent.mkdir()
    garbage.write_bytes(b"\0" * 4096)
    garbage.with_name(f"{DB_NAME}-wal").write_bytes(b"a log of the garbage")
    garbage.with_name(f"{DB_NAME}-shm").write_bytes(b"\0" * 32768)

    restored = restore(copy, garbage)

    assert restored.replaced is not None
    kept_log = garbage.with_name(f"{restored.replaced.name}-wal")
    assert _names(garbage.parent) == sorted([DB_NAME, restored.replaced.name, kept_log.name])
    assert kept_log.read_bytes() == b"a log of the garbage"
    assert _job_ids(garbage) == _job_ids(copy)


def test_a_restore_where_no_store_was_makes_one_but_never_beside_a_lone_log(
    tmp_path: Path,
) -> None:
    copy = _a_copy(tmp_path)
    fresh = tmp_path / "fresh" / "data" / DB_NAME
    restored = restore(copy, fresh)
    assert restored.replaced is None
    assert fresh.parent.stat().st_mode & 0o777 == 0o700
    assert _names(fresh.parent) == [DB_NAME]
    assert _job_ids(fresh) == _job_ids(copy)

    orphan = tmp_path / "orphan" / DB_NAME
    orphan.parent.mkdir()
    orphan.with_name(f"{DB_NAME}-wal").write_bytes(b"whose?")
    with pytest.raises(CopyFailed, match="without its store"):
        restore(copy, orphan)
    assert _names(orphan.parent) == [f"{DB_NAME}-wal"]


def test_the_commands_copy_the_configured_store_and_put_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TANDEM_REDIS_URL", raising=False)
    _closed_store(tmp_path / DB_NAME)
    copy = tmp_path / "copy.db"
    assert main(["backup", "--data-dir", str(tmp_path), str(copy)]) == 0
    assert f"to {copy}" in capsys.readouterr().out
    assert main(["backup", "--data-dir", str(tmp_path), str(copy)]) == EXIT_FAILED
    assert "exists already" in capsys.readouterr().err
    assert main(["restore", "--data-dir", str(tmp_path), str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"restored {tmp_path / DB_NAME} from {copy}" in out
    assert f"kept as {tmp_path / DB_NAME}.replaced-" in out


def test_a_log_left_by_a_restore_cut_short_is_not_applied_to_the_next(tmp_path: Path) -> None:
    """SQLite deletes a log it finds beside an empty database file, as each copy begins."""
    copy = _a_copy(tmp_path)
    other = _closed_store(tmp_path / "other" / DB_NAME)
    _left_with_its_log(other, "from_another_store")
    data = tmp_path / "data"
    data.mkdir()
    # As a crash between checking a copy and renaming it leaves the copy's log behind.
    shutil.copy(other.with_name(f"{DB_NAME}-wal"), data / f".{DB_NAME}.partial-wal")

    restore(copy, data / DB_NAME)

    assert _names(data) == [DB_NAME]
    assert "from_another_store" not in _counters(data / DB_NAME)
    assert _job_ids(data / DB_NAME) == _job_ids(copy)
