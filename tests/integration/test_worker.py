"""A worker's batches: images prepared side by side, lanes run side by side, each answer stored
with its own job; and no one job (unreadable, faulty, rewritten mid-run) stops the worker."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from tandem.errors import QueueUnavailable
from tandem.jobs.latency import AnswerLatency
from tandem.jobs.leases import Leases
from tandem.jobs.records import Claim, Job, JobSpec, JobStatus, new_job_id
from tandem.jobs.redis import RedisJobStore
from tandem.jobs.sqlite import SQLiteJobStore
from tandem.jobs.store import Completed, JobStore, StorePolicy
from tandem.predictions import Prediction
from tandem.runtime.classifier import Classifier, load_classifier
from tandem.webhooks import WebhookPolicy
from tandem.worker import Worker, WorkerConfig
from tests.support import RedisServer, TinySpec, encode, overwrite_meta, solid, tiny_model

RED = encode(solid((255, 0, 0)), "PNG")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    yield store
    await store.close()


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[None]:
    """The worker runs until the block ends, and must still be running then: a job that
    stopped it fails the test."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield
        assert not task.done(), task.exception()
    finally:
        stop.set()
        await task


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
        await worker.stored()  # storing runs as its own task, beside the next batch
        jobs = {name: await _finished(store, job_id) for name, job_id in ids.items()}
        assert jobs["red"].result is not None
        assert jobs["red"].result.label == "class 4"  # the tiny accurate model: red votes 4
        assert jobs["blue"].result is not None
        assert jobs["blue"].result.label == "class 6"
        assert jobs["garbage"].status is JobStatus.FAILED
    finally:
        await asyncio.to_thread(worker.close)
        await store.close()


class Wrapped:
    """The accurate model, with what a subclass defines changed."""

    def __init__(self, classifier: Classifier) -> None:
        self._classifier = classifier

    def __getattr__(self, name: str) -> Any:
        return getattr(self._classifier, name)


class Meeting(Wrapped):
    """The accurate model, but a run starts only once another lane's run is starting too: with
    lanes that run one after another, the first would wait out the barrier and fail."""

    def __init__(self, classifier: Classifier, lanes: int) -> None:
        super().__init__(classifier)
        self.barrier = threading.Barrier(lanes, timeout=10)

    def predict_tensors(
        self, batch: npt.NDArray[np.float32], k: int, **options: Any
    ) -> list[Prediction]:
        self.barrier.wait()
        return self._classifier.predict_tensors(batch, k, **options)


@pytest.mark.parametrize("one_run_per_image", [False, True])
async def test_lanes_run_batches_side_by_side_and_every_answer_finds_its_job(
    tiny_dir: Path, store: SQLiteJobStore, one_run_per_image: bool
) -> None:
    accurate = cast(Classifier, Meeting(load_classifier("tiny_accurate", tiny_dir), lanes=2))
    config = WorkerConfig(batch_size=2, lanes=2, poll_s=0.05, one_run_per_image=one_run_per_image)
    worker = Worker(store, accurate, config)
    colours = {"class 4": (255, 0, 0), "class 6": (0, 0, 255)}  # the tiny model's votes
    expected = {new_job_id(): label for label in colours for _ in range(4)}
    for job_id, label in expected.items():
        await store.enqueue(JobSpec(id=job_id, image=encode(solid(colours[label]), "PNG")))
    async with running(worker):
        jobs = {job_id: await _finished(store, job_id) for job_id in expected}
    assert {job_id: job.status for job_id, job in jobs.items()} == dict.fromkeys(
        expected, JobStatus.DONE
    )
    answers = {job_id: job.result.label for job_id, job in jobs.items() if job.result}
    assert answers == expected


async def test_a_job_the_worker_cannot_read_fails_and_the_queue_goes_on(
    tiny_dir: Path, store: SQLiteJobStore
) -> None:
    """A record from a newer version at the head of the queue used to stop the worker."""
    worker = Worker(store, load_classifier("tiny_accurate", tiny_dir), WorkerConfig(poll_s=0.05))
    newer, good = new_job_id(), new_job_id()
    for job_id in (newer, good):
        await store.enqueue(JobSpec(id=job_id, image=RED))
    overwrite_meta(store.path, '{"v": 2}', newer)
    async with running(worker):
        done = await _finished(store, good)
    assert done.result is not None
    assert done.result.label == "class 4"
    assert (await store.counts())["jobs_failed"] == 1


class FaultyOnBlue(Wrapped):
    """The accurate model, whose preparing fails as a decoder's bug would, on blue images."""

    def tensor(self, image: Any) -> npt.NDArray[np.float32]:
        if image.getpixel((0, 0)) == (0, 0, 255):
            raise RuntimeError("decoder fault")
        return self._classifier.tensor(image)


async def test_a_fault_preparing_one_image_fails_that_job_and_not_its_batch(
    tiny_dir: Path, store: SQLiteJobStore
) -> None:
    accurate = cast(Classifier, FaultyOnBlue(load_classifier("tiny_accurate", tiny_dir)))
    worker = Worker(store, accurate, WorkerConfig(batch_size=2, poll_s=0.05))
    red, blue = new_job_id(), new_job_id()
    await store.enqueue(JobSpec(id=red, image=RED))
    await store.enqueue(JobSpec(id=blue, image=encode(solid((0, 0, 255)), "PNG")))
    async with running(worker):
        failed, done = await _finished(store, blue), await _finished(store, red)
    assert failed.status is JobStatus.FAILED
    assert failed.error == "preparing the image failed: RuntimeError('decoder fault')"
    assert failed.attempts == 1  # deterministic: not tried again
    assert done.status is JobStatus.DONE


class RewritingMidRun(Wrapped):
    """The accurate model, while a newer proxy rewrites every job's record."""

    def __init__(self, classifier: Classifier, store: SQLiteJobStore) -> None:
        super().__init__(classifier)
        self._store = store

    def predict_tensors(
        self, batch: npt.NDArray[np.float32], k: int, **options: Any
    ) -> list[Prediction]:
        overwrite_meta(self._store.path, '{"v": 2}')
        return self._classifier.predict_tensors(batch, k, **options)


@pytest.mark.parametrize("one_run_per_image", [False, True], ids=["one-run", "image-by-image"])
async def test_scores_that_are_not_finite_fail_their_job_for_good_and_not_its_batch(
    tmp_path: Path, store: SQLiteJobStore, one_run_per_image: bool
) -> None:
    """A model's NaN went into the stored answer: GET /job then failed on it with a 500."""
    tiny_model(tmp_path / "nan", TinySpec(name="nan", size=40, votes=(4, 5, 6), nan_when_blue=True))
    accurate = load_classifier("nan", tmp_path)
    worker = Worker(store, accurate, WorkerConfig(one_run_per_image=one_run_per_image))
    ids = {"red": new_job_id(), "blue": new_job_id()}
    try:
        for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            await store.enqueue(JobSpec(id=ids[name], image=encode(solid(colour), "PNG")))
        await worker.process(await store.claim(worker.id, 2, 0))
        await worker.stored()
        red, blue = [await _finished(store, ids[name]) for name in ("red", "blue")]
        assert red.result is not None
        assert red.result.label == "class 4"
        assert blue.status is JobStatus.FAILED
        assert blue.attempts == 1  # not retried: the same image gives the same scores
        assert blue.error == "the model nan gave scores that are not finite (NaN or infinity)"
    finally:
        await asyncio.to_thread(worker.close)


async def test_a_job_rewritten_by_a_newer_version_mid_run_keeps_its_answer(
    tiny_dir: Path, store: SQLiteJobStore
) -> None:
    """Reading it back (for its webhook) stopped the worker, as an unreadable claim did."""
    accurate = cast(Classifier, RewritingMidRun(load_classifier("tiny_accurate", tiny_dir), store))
    hooks = WebhookPolicy(allowed_hosts=frozenset({"hooks.example"}), secret="s" * 16)
    worker = Worker(store, accurate, WorkerConfig(poll_s=0.05, webhooks=hooks))
    await store.enqueue(JobSpec(id=new_job_id(), image=RED, callback_url="http://hooks.example/h"))
    async with running(worker):
        await _done_jobs(store, 1)
        # The next batch meets the first one's storing, which raised before the change.
        await store.enqueue(JobSpec(id=new_job_id(), image=RED))
        await _done_jobs(store, 2)


class RenewsWhileReadingBack(SQLiteJobStore):
    """Renews the worker's leases while it reads a job it has just finished back for its
    webhook: a moment its lease keeper, every third of the visibility timeout, may fall on."""

    leases: Leases | None = None
    renewed: asyncio.Event

    async def get(self, job_id: str) -> Job | None:
        job = await super().get(job_id)
        if self.leases is not None and job is not None and job.status is JobStatus.DONE:
            await self.leases.renew()
            self.renewed.set()
        return job


async def test_a_job_stored_but_not_yet_let_go_is_not_said_taken_over(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 15-minute soak of tandem up logged twice that a held job had been taken over by
    another worker: the renewal fell after the job's answer was stored, while the worker still
    held it for its webhook, and a finished job is not renewed."""
    caplog.set_level(logging.WARNING, logger="tandem.worker")
    store = RenewsWhileReadingBack(tmp_path / "jobs.db")
    await store.open()
    hooks = WebhookPolicy(
        allowed_hosts=frozenset({"hooks.example"}), secret="s" * 16, max_attempts=1, timeout_s=1
    )
    accurate = load_classifier("tiny_accurate", tiny_dir)
    worker = Worker(store, accurate, WorkerConfig(poll_s=0.05, webhooks=hooks))
    store.leases, store.renewed = worker._leases, asyncio.Event()
    try:
        await store.enqueue(
            JobSpec(id=new_job_id(), image=RED, callback_url="http://hooks.example/h")
        )
        async with running(worker):
            await asyncio.wait_for(store.renewed.wait(), 10)
    finally:
        await store.close()
    assert [r.getMessage() for r in caplog.records if "taken over" in r.getMessage()] == []


class Slow(Wrapped):
    """The accurate model, taking `seconds` longer over each run."""

    def __init__(self, classifier: Classifier, seconds: float) -> None:
        super().__init__(classifier)
        self._seconds = seconds

    def predict_tensors(
        self, batch: npt.NDArray[np.float32], k: int, **options: Any
    ) -> list[Prediction]:
        time.sleep(self._seconds)
        return self._classifier.predict_tensors(batch, k, **options)


_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "redis"])
async def leasing(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """A store on either backend whose leases run out after 1 s."""
    policy = StorePolicy(visibility_timeout_s=1.0)
    store: JobStore
    if request.param == "sqlite":
        store = SQLiteJobStore(tmp_path / "jobs.db", policy)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisJobStore(server.url, policy, prefix=f"leasing{next(_prefixes)}")
    await store.open()
    yield store
    await store.close()


async def test_a_run_longer_than_its_lease_is_not_handed_to_a_second_worker(
    tiny_dir: Path, leasing: JobStore
) -> None:
    """The worker renews the leases of the jobs it holds. Before, a job whose run outlasted the
    visibility timeout was claimed by the next worker to ask, and run a second time."""
    accurate = cast(Classifier, Slow(load_classifier("tiny_accurate", tiny_dir), 2.5))
    worker = Worker(leasing, accurate, WorkerConfig(poll_s=0.05))
    job_id = new_job_id()
    await leasing.enqueue(JobSpec(id=job_id, image=RED))
    taken_over = []
    async with running(worker), asyncio.timeout(10):
        await _job_where(leasing, job_id, lambda job: job.status is not JobStatus.QUEUED)
        while not (job := await _job_where(leasing, job_id, lambda _: True)).status.terminal:
            taken_over += await leasing.claim("another worker", 1, 0)
            await asyncio.sleep(0.1)
    assert taken_over == []
    assert job.status is JobStatus.DONE
    assert job.attempts == 1


class LosingAnswers(SQLiteJobStore):
    """A store that cannot take answers, as when its disk is full."""

    async def complete_many(self, *args: Any, **kwargs: Any) -> Completed:
        raise QueueUnavailable("the job store failed: database or disk is full")


async def test_a_job_whose_answer_could_not_be_stored_comes_back_by_its_lease(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """The worker lets go of what it could not store: renewing it still would have held the job
    as running for as long as the worker lived."""
    store = LosingAnswers(tmp_path / "jobs.db", StorePolicy(visibility_timeout_s=1.0))
    await store.open()
    worker = Worker(store, load_classifier("tiny_accurate", tiny_dir), WorkerConfig(poll_s=0.05))
    job_id = new_job_id()
    await store.enqueue(JobSpec(id=job_id, image=RED))
    try:
        async with running(worker):
            # Claimed again (by this worker, the only one) once the first lease ran out.
            await _job_where(store, job_id, lambda job: job.attempts >= 2)
    finally:
        await store.close()


class Away(SQLiteJobStore):
    """A store that refuses claims and heartbeats while `away`, as Redis does when it is down
    or refuses the password."""

    away = True

    async def claim(self, *args: Any, **kwargs: Any) -> list[Claim]:
        if self.away:
            raise QueueUnavailable("Redis is unavailable: invalid username-password pair")
        return await super().claim(*args, **kwargs)

    async def beat(self, *args: Any, **kwargs: Any) -> None:
        if self.away:
            raise QueueUnavailable("Redis is unavailable: invalid username-password pair")
        await super().beat(*args, **kwargs)


async def test_a_queue_that_stays_away_is_logged_once_and_its_return_too(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker retrying every poll had logged two lines each time, for as long as it lasted."""
    caplog.set_level(logging.INFO, logger="tandem.worker")
    store = Away(tmp_path / "jobs.db")
    await store.open()
    worker = Worker(store, load_classifier("tiny_accurate", tiny_dir), WorkerConfig(poll_s=0.01))
    try:
        async with running(worker):
            await asyncio.sleep(0.5)  # about 50 claims refused
            store.away = False
            job_id = new_job_id()
            await store.enqueue(JobSpec(id=job_id, image=RED))
            await _finished(store, job_id)
    finally:
        await store.close()
    lines = [record.getMessage() for record in caplog.records if record.name == "tandem.worker"]
    faults = [line for line in lines if " failed: " in line or " recovered after " in line]
    refused = "Redis is unavailable: invalid username-password pair"
    assert faults[:2] == [
        f"housekeeping failed: {refused}",
        f"claiming jobs failed: {refused}; retrying every 0.01 s",
    ]
    assert sorted(re.sub(r"\d+ s$", "N s", line) for line in faults[2:]) == [
        "claiming jobs recovered after N s",
        "housekeeping recovered after N s",
    ]


async def _stops_within(worker: Worker, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.3)  # well into its first wait
    stop.set()
    await asyncio.wait_for(task, seconds)


async def test_an_idle_worker_told_to_stop_does_not_sit_out_its_poll(
    tiny_dir: Path, leasing: JobStore
) -> None:
    """Every stop of an idle proxy or worker had waited out the claim in hand (1 s)."""
    worker = Worker(leasing, load_classifier("tiny_accurate", tiny_dir), WorkerConfig(poll_s=30))
    await _stops_within(worker, 1.0)


async def test_a_worker_waiting_for_its_queue_to_come_back_stops_at_once(
    tiny_dir: Path, tmp_path: Path
) -> None:
    store = Away(tmp_path / "jobs.db")
    await store.open()
    worker = Worker(store, load_classifier("tiny_accurate", tiny_dir), WorkerConfig(poll_s=30))
    try:
        await _stops_within(worker, 1.0)
    finally:
        await store.close()


async def test_each_answer_counts_how_long_its_job_waited_for_it(
    tiny_dir: Path, store: SQLiteJobStore
) -> None:
    """Each job the worker answers counts once, with its wait; a job that another worker had
    answered meanwhile (its answer here dropped) does not count again."""
    worker = Worker(store, load_classifier("tiny_accurate", tiny_dir), WorkerConfig(poll_s=0.05))
    waiting, answered_elsewhere = new_job_id(), new_job_id()
    for job_id in (waiting, answered_elsewhere):
        await store.enqueue(JobSpec(id=job_id, image=RED))
    claims = await store.claim(worker.id, 2, 0)
    assert await store.complete(answered_elsewhere, Prediction("m", (), 1.0))
    await asyncio.sleep(0.3)
    async with running(worker):  # which writes its counts when it stops
        await worker.process(claims)
        await _finished(store, waiting)
    histogram = AnswerLatency.from_counts(await store.counts())
    assert histogram.count == 1, histogram
    assert dict(histogram.buckets)["0.25"] == 0, histogram  # it waited 0.3 s at least
    assert 0.3 <= histogram.sum_s < 10.0


async def _done_jobs(store: SQLiteJobStore, n: int, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if (await store.counts()).get("jobs_done", 0) >= n:
                return
            await asyncio.sleep(0.01)


async def _finished(store: JobStore, job_id: str, timeout_s: float = 10.0) -> Job:
    return await _job_where(store, job_id, lambda job: job.status.terminal, timeout_s)


async def _job_where(
    store: JobStore, job_id: str, holds: Callable[[Job], bool], timeout_s: float = 10.0
) -> Job:
    """The job, once `holds` is true of it."""
    async with asyncio.timeout(timeout_s):
        while True:
            job = await store.get(job_id)
            if job is not None and holds(job):
                return job
            await asyncio.sleep(0.01)
