"""`tandem backup`: a copy of the SQLite store taken while it serves."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from tandem.cli import EXIT_CONFIG, EXIT_FAILED, main
from tandem.errors import BackupFailed
from tandem.jobs.factory import DB_NAME
from tandem.jobs.records import JobSpec, JobStatus, new_job_id
from tandem.jobs.sqlite import MIB, SQLiteJobStore, upkeep
from tandem.jobs.sqlite.backup import back_up
from tandem.predictions import Prediction, Scored

ANSWER = Prediction("m", (Scored(1, "one", 0.9),), 1.0)


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
    with pytest.raises(BackupFailed, match="exists already"):
        back_up(store, dest)
    assert dest.read_bytes() == b"an earlier copy"


def test_a_copy_that_may_not_fit_is_refused_before_it_begins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filling the store's disk would stop its writes, the workers' included."""
    store = _closed_store(tmp_path / DB_NAME)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(BackupFailed, match="above TANDEM_MIN_FREE_DISK_MB"):
        back_up(store, tmp_path / "copy.db", keep_free_bytes=free)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(free=MIB))
    with pytest.raises(BackupFailed, match=r"needs up to 1 MiB, and .* has 1 MiB free$"):
        back_up(store, tmp_path / "copy.db")
    assert not list(tmp_path.glob("*copy*"))


def test_a_copy_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(BackupFailed, match="no job store"):
        back_up(tmp_path / DB_NAME, tmp_path / "copy.db")
    not_sqlite = tmp_path / "other" / DB_NAME
    not_sqlite.parent.mkdir()
    not_sqlite.write_bytes(b"not a database" * 100)
    with pytest.raises(BackupFailed, match="could not be copied"):
        back_up(not_sqlite, tmp_path / "copy.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_the_command_copies_the_configured_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TANDEM_REDIS_URL", raising=False)
    _closed_store(tmp_path / DB_NAME)
    copy = tmp_path / "copy.db"
    assert main(["backup", "--data-dir", str(tmp_path), str(copy)]) == 0
    assert f"to {copy}" in capsys.readouterr().out
    assert main(["backup", "--data-dir", str(tmp_path), str(copy)]) == EXIT_FAILED
    assert "exists already" in capsys.readouterr().err


def test_the_command_sends_a_redis_user_to_redis_s_tools(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("TANDEM_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["backup", str(tmp_path / "copy.db")]) == EXIT_CONFIG
    assert "Redis's own tools" in capsys.readouterr().err
