"""A worker's batch: images prepared side by side, each answer stored with its own job."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tandem.jobs.records import Job, JobSpec, JobStatus, new_job_id
from tandem.jobs.sqlite import SQLiteJobStore
from tandem.runtime.classifier import load_classifier
from tandem.worker import Worker, WorkerConfig
from tests.support import encode, solid


async def test_a_batch_prepared_on_several_threads_keeps_each_answer_with_its_job(
    tiny_dir: Path, tmp_path: Path
) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    accurate = load_classifier("tiny_accurate", tiny_dir)
    worker = Worker(store, accurate, WorkerConfig(prepare_threads=3))
    images = {
        "red": encode(solid((255, 0, 0)), "PNG"),
        "garbage": b"not an image at all",
        "blue": encode(solid((0, 0, 255)), "PNG"),
    }
    ids = {name: new_job_id() for name in images}
    try:
        for name, image in images.items():
            await store.enqueue(JobSpec(id=ids[name], image=image))
        await worker.process(await store.claim(worker.id, 3, 0))
        await asyncio.sleep(0)  # storing runs as its own task, beside the next batch
        jobs = {name: await _finished(store, job_id) for name, job_id in ids.items()}
        assert jobs["red"].result is not None
        assert jobs["red"].result.label == "class 4"  # the tiny accurate model: red votes 4
        assert jobs["blue"].result is not None
        assert jobs["blue"].result.label == "class 6"
        assert jobs["garbage"].status is JobStatus.FAILED
    finally:
        await asyncio.to_thread(worker.close)
        await store.close()


async def _finished(store: SQLiteJobStore, job_id: str, timeout_s: float = 10.0) -> Job:
    async with asyncio.timeout(timeout_s):
        while True:
            job = await store.get(job_id)
            if job is not None and job.status.terminal:
                return job
            await asyncio.sleep(0.01)
