"""The embedded worker gives way to the fast model: nothing of it runs while a fast call is in
flight, until its patience is spent (issue 4: the fast path protected)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tandem.api.app import create_app
from tandem.jobs.records import JobSpec, JobStatus, new_job_id
from tandem.jobs.sqlite import SQLiteJobStore
from tandem.runtime.classifier import ThreadPlan, load_classifier
from tandem.runtime.priority import GiveWay, Occupancy
from tandem.settings import Settings
from tandem.worker import Worker, WorkerConfig
from tests.support import b64, encode, fast_call_in_flight, record_runs, solid

IMAGE = encode(solid((0, 0, 255)), "PNG")


async def _status(store: SQLiteJobStore, job_id: str) -> JobStatus:
    job = await store.get(job_id)
    assert job is not None
    return job.status


@contextlib.asynccontextmanager
async def giving_way(
    tiny_dir: Path, tmp_path: Path, patience_s: float
) -> AsyncIterator[tuple[SQLiteJobStore, Occupancy, Worker]]:
    """A store, the fast model's calls, and a worker that gives way to them."""
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    calls = Occupancy()
    # One thread beside the fast model, two with the cores to itself (see Classifier).
    accurate = load_classifier("tiny_accurate", tiny_dir, ThreadPlan(threads=1, solo=2))
    give_way = GiveWay(calls, quiet_s=0.0, patience_s=patience_s)
    worker = Worker(store, accurate, WorkerConfig(), give_way)
    try:
        yield store, calls, worker
    finally:
        await asyncio.to_thread(worker.close)
        await store.close()


async def test_a_worker_giving_way_waits_for_the_fast_model(tiny_dir: Path, tmp_path: Path) -> None:
    async with giving_way(tiny_dir, tmp_path, patience_s=30) as (store, calls, worker):
        job_id = new_job_id()
        await store.enqueue(JobSpec(id=job_id, image=IMAGE))
        with fast_call_in_flight(calls) as leave:
            processing = asyncio.create_task(worker.process(await store.claim(worker.id, 1, 0)))
            await asyncio.sleep(0.5)
            assert not processing.done()
            assert await _status(store, job_id) is JobStatus.RUNNING
            leave.set()
            await asyncio.wait_for(processing, 10)
        assert await _status(store, job_id) is JobStatus.DONE


async def test_a_worker_out_of_patience_runs_beside_the_fast_model(
    tiny_dir: Path, tmp_path: Path
) -> None:
    async with giving_way(tiny_dir, tmp_path, patience_s=0.1) as (store, calls, worker):
        job_ids = [new_job_id() for _ in range(3)]
        for job_id in job_ids:
            await store.enqueue(JobSpec(id=job_id, image=IMAGE))
        with fast_call_in_flight(calls):  # a fast model that never rests
            await asyncio.wait_for(worker.process(await store.claim(worker.id, 3, 0)), 10)
            await worker.stored()
            assert [await _status(store, job_id) for job_id in job_ids] == [JobStatus.DONE] * 3


async def test_a_run_with_the_cores_to_itself_uses_them_all_and_one_beside_uses_one(
    tiny_dir: Path, tmp_path: Path
) -> None:
    async with giving_way(tiny_dir, tmp_path, patience_s=0.1) as (store, calls, worker):
        runs: list[str] = []
        record_runs(worker.classifier._solo, "every core", runs)
        record_runs(worker.classifier._session, "one thread", runs)
        for _ in range(2):
            await store.enqueue(JobSpec(id=new_job_id(), image=IMAGE))
        await worker.process(await store.claim(worker.id, 1, 0))
        with fast_call_in_flight(calls):
            await worker.process(await store.claim(worker.id, 1, 0))
        assert runs == ["every core", "one thread"]


def test_the_embedded_worker_gives_way_to_the_servers_own_fast_calls(
    tiny_dir: Path, tmp_path: Path, open_app: Any
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        model_dir=tiny_dir,
        fast_model="tiny_fast",
        accurate_model="tiny_accurate",
        give_way_patience_s=5.0,
    )
    client = open_app(settings)
    service = client.app.state.service  # type: ignore[attr-defined]
    with fast_call_in_flight(service.calls) as leave:
        job = client.post("/predict", json={"image_data": b64(IMAGE)}).json()["job_id"]
        time.sleep(0.5)
        assert client.get(f"/job/{job}").json()["status"] in ("queued", "running")
        leave.set()
        deadline = time.monotonic() + 10
        while client.get(f"/job/{job}").json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_an_embedded_worker_that_fails_is_reported_at_once_and_the_app_still_stops(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    async def broken(self: Worker, stop: asyncio.Event) -> None:
        raise RuntimeError("a bug in the worker")

    monkeypatch.setattr(Worker, "run", broken)
    settings = Settings(
        data_dir=tmp_path,
        model_dir=tiny_dir,
        fast_model="tiny_fast",
        accurate_model="tiny_accurate",
    )
    with caplog.at_level(logging.ERROR, logger="tandem.api"):
        client = TestClient(create_app(settings)).__enter__()
        try:
            deadline = time.monotonic() + 5
            while not any("embedded worker stopped" in r.message for r in caplog.records):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            (report,) = [r for r in caplog.records if "embedded worker stopped" in r.message]
            assert report.exc_info is not None
            assert str(report.exc_info[1]) == "a bug in the worker"
            # The proxy still answers fast and queues the job, for a worker after a restart;
            # liveness fails, so that a supervisor makes that restart.
            response = client.post("/predict", json={"image_data": b64(IMAGE)})
            assert response.status_code == 200
            stopped = "the embedded worker stopped: RuntimeError('a bug in the worker')"
            health = client.get("/health")
            assert (health.status_code, health.json()) == (503, {"health": stopped})
            assert client.get("/health/all").json()["tiny_accurate"] == stopped
        finally:
            client.__exit__(None, None, None)  # shuts down: must not raise the worker's error
    store = SQLiteJobStore(tmp_path / "tandem.db")
    assert asyncio.run(_queued_after_close(store, response.json()["job_id"])) is JobStatus.QUEUED


async def _queued_after_close(store: SQLiteJobStore, job_id: str) -> JobStatus:
    await store.open()
    try:
        return await _status(store, job_id)
    finally:
        await store.close()
