"""No accepted job is lost: SIGKILL the embedded server, restart it, and every job is answered."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from skimage import data as photos

from tandem.jobs.factory import DB_NAME
from tandem.jobs.records import JobSpec, new_job_id
from tandem.jobs.sqlite import SQLiteJobStore
from tests.support import ServerProcess, b64, clean_env, encode, wait_for_job

pytestmark = pytest.mark.slow

JOBS = 24


def _submit(server: ServerProcess, count: int) -> list[str]:
    body = {"image_data": b64(encode(photos.chelsea()))}

    def one(_: int) -> str:
        with server.client() as client:
            response = client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        return str(response.json()["job_id"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(count)))


def _env(model_dir: Path, data_dir: Path) -> dict[str, str]:
    # A short lease so jobs a killed worker held are taken over within the test's patience;
    # the embedded worker's giving way must fit in it.
    return clean_env(
        model_dir=str(model_dir),
        data_dir=str(data_dir),
        visibility_timeout_s="2",
        give_way_patience_s="0.2",
    )


def _restart_and_wait(env: dict[str, str], tmp_path: Path, ids: list[str]) -> list[dict]:
    restarted = ServerProcess(tmp_path / "restarted.log", env).start()
    try:
        with restarted.client() as client:
            return [wait_for_job(client, job_id) for job_id in ids]
    finally:
        restarted.stop()


def test_jobs_queued_before_a_sigkill_are_done_after_restart(
    model_dir: Path, tmp_path: Path
) -> None:
    env = _env(model_dir, tmp_path)
    # No worker: every accepted job is still queued when the process dies.
    server = ServerProcess(tmp_path / "first.log", env, "--no-worker").start()
    ids = _submit(server, JOBS)
    with server.client() as client:
        assert {client.get(f"/job/{i}").json()["status"] for i in ids} == {"queued"}
    server.kill()

    finals = _restart_and_wait(env, tmp_path, ids)
    assert [job["status"] for job in finals] == ["done"] * JOBS
    assert all(job[job["job_id"]]["prediction"] for job in finals)


def test_jobs_in_flight_during_a_sigkill_are_done_after_restart(
    model_dir: Path, tmp_path: Path
) -> None:
    env = _env(model_dir, tmp_path)
    server = ServerProcess(tmp_path / "first.log", env).start()
    ids = _submit(server, JOBS)
    server.kill()  # the worker is busy with the accurate model while this lands

    finals = _restart_and_wait(env, tmp_path, ids)
    assert [job["status"] for job in finals] == ["done"] * JOBS
    assert len({job["job_id"] for job in finals}) == JOBS


def test_a_job_that_cannot_be_processed_says_failed_with_the_reason(
    real_server: ServerProcess, tmp_path: Path
) -> None:
    # Bytes the proxy would never accept, put straight into the queue the server's worker reads.
    data_dir = Path(real_server.env["TANDEM_DATA_DIR"])
    job_id = new_job_id()

    async def enqueue() -> None:
        store = SQLiteJobStore(data_dir / DB_NAME)
        await store.open()
        await store.enqueue(JobSpec(id=job_id, image=b"definitely not an image"))
        await store.close()

    asyncio.run(enqueue())
    with real_server.client() as client:
        job = wait_for_job(client, job_id)
    assert job["status"] == "failed"
    assert "not an image" in job["error"]
    assert job[job_id] == {"prediction": ""}


def test_the_queue_holds_the_exact_bytes_the_client_sent(model_dir: Path, tmp_path: Path) -> None:
    # PNG with metadata: any re-encoding by the proxy would change these bytes.
    sent = encode(photos.coffee(), "PNG", optimize=False)
    server = ServerProcess(tmp_path / "s.log", _env(model_dir, tmp_path), "--no-worker").start()
    try:
        with server.client() as client:
            job_id = client.post("/predict", json={"image_data": b64(sent)}).json()["job_id"]
    finally:
        server.stop()

    async def claim() -> bytes:
        store = SQLiteJobStore(tmp_path / DB_NAME)
        await store.open()
        try:
            (claimed,) = await store.claim("test", 1, 0)
        finally:
            await store.close()
        assert claimed.id == job_id
        return claimed.image

    assert asyncio.run(claim()) == sent


# Fills a store with images, finishes 9 jobs in 10 (scattered free pages), writes the hashes
# of the queued images and the free pages, then purges, which gives pages back 8 at a time in
# the background, and says "step" each time it sees fewer free, until killed.
RECLAIMING = textwrap.dedent(
    """
    import asyncio, hashlib, json, os, sys
    from pathlib import Path
    from tandem.jobs.sqlite import SQLiteJobStore, upkeep
    from tandem.jobs.records import JobSpec, new_job_id
    from tandem.predictions import Prediction, Scored

    async def main(path, kept):
        upkeep.KEEP_FREE_BYTES, upkeep.RECLAIM_STEP_PAGES = 0, 8
        store = SQLiteJobStore(path)
        await store.open()
        specs = [JobSpec(id=new_job_id(), image=os.urandom(60_000)) for _ in range(300)]
        for spec in specs:
            await store.enqueue(spec)
        claims = await store.claim("w", len(specs), 0)
        answer = Prediction("m", (Scored(1, "one", 0.9),), 1.0)
        await store.complete_many({c.id: answer for n, c in enumerate(claims) if n % 10})
        for claim in claims[::10]:
            await store.fail(claim.id, "again", retry=True)  # queued again
        free = await store._run(upkeep.free_pages_bytes)
        images = {c.id: hashlib.sha256(c.image).hexdigest() for c in claims[::10]}
        kept.write_text(json.dumps({"images": images, "free": free}))
        await store.purge_expired()
        while True:
            now = await store._run(upkeep.free_pages_bytes)
            if now < free:
                print("step", flush=True)
                free = now
            await asyncio.sleep(0)

    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
    """
)


def _kill_while_reclaiming(path: Path, kept: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", RECLAIMING, str(path), str(kept)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        for _ in range(20):  # 20 steps in, some 500 to go
            assert child.stdout.readline().strip() == "step"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


async def test_a_sigkill_while_pages_move_loses_no_queued_image(tmp_path: Path) -> None:
    """Giving pages back moves the pages of queued images: a crash among its steps keeps them."""
    path, kept = tmp_path / DB_NAME, tmp_path / "kept.json"
    _kill_while_reclaiming(path, kept)
    before = json.loads(kept.read_text())
    with contextlib.closing(sqlite3.connect(path)) as c:
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        free = c.execute("PRAGMA freelist_count").fetchone()[0] * 4096
        assert 0 < free <= before["free"] - 20 * 8 * 4096  # stopped midway
    store = SQLiteJobStore(path)
    await store.open()
    try:
        claims = await store.claim("w", 1000, 0)
        assert {c.id: hashlib.sha256(c.image).hexdigest() for c in claims} == before["images"]
    finally:
        await store.close()
