"""The JobStore contract. Every backend runs exactly these tests (add it to `BACKENDS`).

Time is real: Redis keeps its own clock for idle entries and key TTLs. Tests that need something
to expire use SHORT, whose times run out within a second; the others use LONG, whose never do
during a test, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tandem.errors import QueueFull, TooManyQueued, UnreadableJob
from tandem.jobs.records import Delivery, DeliveryState, JobSpec, JobStatus, new_job_id
from tandem.jobs.redis import RedisJobStore
from tandem.jobs.sqlite import SQLiteJobStore
from tandem.jobs.store import MISSING_IMAGE, Completed, JobStore, StorePolicy
from tandem.predictions import Prediction, Scored
from tests.support import RedisServer, claim_told_to_stop, overwrite_meta

LONG = StorePolicy(result_ttl_s=600.0, visibility_timeout_s=600.0, max_attempts=2)
SHORT = StorePolicy(result_ttl_s=0.3, visibility_timeout_s=0.3, max_attempts=2)
PAUSE = 0.5  # longer than every SHORT time
# For a lease that must still hold after a pause: each step's margin is 0.6 s.
RENEWABLE = StorePolicy(result_ttl_s=600.0, visibility_timeout_s=1.5, max_attempts=2)

StoreFactory = Callable[[StorePolicy], JobStore]
_prefixes = itertools.count()


def sqlite_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    return lambda policy: SQLiteJobStore(tmp_path / "jobs.db", policy)


def redis_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"contract{next(_prefixes)}"  # a fresh keyspace per test, shared by its reopenings
    return lambda policy: RedisJobStore(server.url, policy, prefix=prefix)


BACKENDS = {"sqlite": sqlite_factory, "redis": redis_factory}


async def _sqlite_meta(store: JobStore, job_id: str, meta: str) -> None:
    assert isinstance(store, SQLiteJobStore)
    overwrite_meta(store.path, meta, job_id)


async def _redis_meta(store: JobStore, job_id: str, meta: str) -> None:
    assert isinstance(store, RedisJobStore)
    await store._client.hset(store._job_key(job_id), "meta", meta)


async def _sqlite_drop_image(store: JobStore, job_id: str) -> None:
    assert isinstance(store, SQLiteJobStore)
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("DELETE FROM images WHERE job_id = ?", (job_id,))


async def _redis_drop_image(store: JobStore, job_id: str) -> None:
    assert isinstance(store, RedisJobStore)
    await store._client.hdel(store._job_key(job_id), "image")


async def _sqlite_old_worker(store: JobStore, worker_id: str, model: str, seen_at: float) -> None:
    assert isinstance(store, SQLiteJobStore)
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("INSERT INTO workers VALUES (?, ?, ?)", (worker_id, model, seen_at))


async def _redis_old_worker(store: JobStore, worker_id: str, model: str, seen_at: float) -> None:
    assert isinstance(store, RedisJobStore)
    await store._client.zadd(f"{store._prefix}:workers", {worker_id: seen_at})
    await store._client.hset(f"{store._prefix}:models", worker_id, model)


# A worker's heartbeat from long ago, written as the backend keeps it.
OLD_WORKER = {SQLiteJobStore: _sqlite_old_worker, RedisJobStore: _redis_old_worker}

# How each backend's stored job is damaged behind its back: its metadata overwritten, as by
# a newer version, or its image lost.
OVERWRITE_META = {SQLiteJobStore: _sqlite_meta, RedisJobStore: _redis_meta}
DROP_IMAGE = {SQLiteJobStore: _sqlite_drop_image, RedisJobStore: _redis_drop_image}


@pytest.fixture(params=sorted(BACKENDS))
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    return BACKENDS[request.param](request, tmp_path)


async def _opened(factory: StoreFactory, policy: StorePolicy) -> JobStore:
    store = factory(policy)
    await store.open()
    return store


@pytest.fixture
async def store(factory: StoreFactory) -> AsyncIterator[JobStore]:
    store = await _opened(factory, LONG)
    yield store
    await store.close()


@pytest.fixture
async def short(factory: StoreFactory) -> AsyncIterator[JobStore]:
    store = await _opened(factory, SHORT)
    yield store
    await store.close()


def spec(image: bytes = b"\xff\xd8 image bytes \x00\x01") -> JobSpec:
    return JobSpec(id=new_job_id(), image=image, request_id="req-1")


def answer(label: str = "tabby") -> Prediction:
    return Prediction("m", (Scored(281, label, 0.9), Scored(282, "tiger cat", 0.05)), 12.5)


async def test_enqueue_returns_a_queued_job_that_get_finds(store: JobStore) -> None:
    s = spec()
    job = await store.enqueue(s)
    assert job.id == s.id
    assert job.status is JobStatus.QUEUED
    assert job.attempts == 0
    assert job.request_id == "req-1"
    assert await store.get(s.id) == job
    assert await store.queue_depth() == 1
    full = replace(spec(), fast=answer("fast"), callback_url="http://hooks.test/x")
    assert await store.enqueue(full) == await store.get(full.id)


async def test_a_queued_image_counts_in_what_the_store_takes(store: JobStore) -> None:
    """Each backend's room toward its limit is tested on its own (a small disk, a Redis at its
    maxmemory): here, that an image shows in `used_bytes`. A SQLite WAL may reuse room a
    checkpoint left, hence half."""
    before = await store.space()
    image = os.urandom(1024 * 1024)
    await store.enqueue(spec(image))
    after = await store.space()
    assert before is not None
    assert after is not None
    assert after.used_bytes - before.used_bytes >= len(image) // 2
    assert 0 < after.room_bytes < math.inf  # the disk's free space, or Redis's 1 GB limit


async def test_get_of_an_unknown_id_is_none(store: JobStore) -> None:
    assert await store.get(new_job_id()) is None


async def test_enqueue_is_idempotent_on_the_id(store: JobStore) -> None:
    s = spec()
    first = await store.enqueue(s)
    again = await store.enqueue(JobSpec(id=s.id, image=b"other"))
    assert again == first
    assert await store.queue_depth() == 1
    (claim,) = await store.claim("w", 10, 0)
    assert claim.image == s.image


async def test_claim_hands_over_the_exact_bytes_oldest_first(store: JobStore) -> None:
    specs = []
    for i in range(3):
        specs.append(spec(bytes([i]) * 10))
        await store.enqueue(specs[-1])
    claims = await store.claim("w", 2, 0)
    assert [c.id for c in claims] == [specs[0].id, specs[1].id]
    assert [c.image for c in claims] == [specs[0].image, specs[1].image]
    assert all(c.job.status is JobStatus.RUNNING and c.job.attempts == 1 for c in claims)


async def test_a_claimed_job_is_not_claimed_again_while_leased(store: JobStore) -> None:
    await store.enqueue(spec())
    assert len(await store.claim("w1", 10, 0)) == 1
    assert await store.claim("w2", 10, 0) == []


async def test_complete_stores_the_result_once(store: JobStore) -> None:
    s = spec()
    await store.enqueue(s)
    await store.claim("w", 1, 0)
    assert await store.complete(s.id, answer("tabby")) is True
    assert await store.complete(s.id, answer("other")) is False
    job = await store.get(s.id)
    assert job is not None
    assert job.status is JobStatus.DONE
    assert job.result == answer("tabby")
    assert job.finished_at is not None
    assert await store.queue_depth() == 0


async def test_an_expired_lease_is_claimed_again(short: JobStore) -> None:
    s = spec()
    await short.enqueue(s)
    await short.claim("dead worker", 1, 0)
    await asyncio.sleep(PAUSE)
    (claim,) = await short.claim("w2", 1, 0)
    assert claim.id == s.id
    assert claim.job.attempts == 2


async def test_a_renewed_lease_outlasts_the_visibility_timeout(factory: StoreFactory) -> None:
    store = await _opened(factory, RENEWABLE)
    try:
        s = spec()
        await store.enqueue(s)
        await store.claim("w", 1, 0)
        await asyncio.sleep(0.9)
        assert await store.extend("w", [s.id]) == {s.id}
        await asyncio.sleep(0.9)  # past the claim's own lease, within the renewed one
        assert await store.claim("w2", 1, 0) == []
        await asyncio.sleep(1.6)  # the worker stopped renewing
        (claim,) = await store.claim("w2", 1, 0)
        assert claim.job.attempts == 2
    finally:
        await store.close()


async def test_extend_renews_only_the_workers_own_running_jobs(store: JobStore) -> None:
    mine, finished, queued = spec(), spec(), spec()
    for s in (mine, finished):
        await store.enqueue(s)
    assert len(await store.claim("w", 2, 0)) == 2
    await store.complete(finished.id, answer())
    await store.enqueue(queued)
    asked = [mine.id, finished.id, queued.id, new_job_id()]
    assert await store.extend("w", asked) == {mine.id}
    assert await store.extend("another worker", asked) == frozenset()
    assert await store.extend("w", []) == frozenset()


async def test_a_lease_taken_over_is_renewed_by_its_new_worker_only(short: JobStore) -> None:
    s = spec()
    await short.enqueue(s)
    await short.claim("stalled worker", 1, 0)
    await asyncio.sleep(PAUSE)
    assert len(await short.claim("w2", 1, 0)) == 1
    assert await short.extend("stalled worker", [s.id]) == frozenset()
    assert await short.extend("w2", [s.id]) == {s.id}


async def test_a_job_whose_workers_keep_dying_is_failed(short: JobStore) -> None:
    s = spec()
    await short.enqueue(s)
    for _ in range(SHORT.max_attempts):
        assert len(await short.claim("w", 1, 0)) == 1
        await asyncio.sleep(PAUSE)
    assert await short.claim("w", 1, 0) == []
    job = await short.get(s.id)
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert "stopped" in job.error


async def test_a_late_result_after_redelivery_is_stored_once(short: JobStore) -> None:
    s = spec()
    await short.enqueue(s)
    await short.claim("slow", 1, 0)
    await asyncio.sleep(PAUSE)
    assert len(await short.claim("fast", 1, 0)) == 1
    assert await short.complete(s.id, answer("first")) is True
    assert await short.complete(s.id, answer("second")) is False
    job = await short.get(s.id)
    assert job is not None
    assert job.result == answer("first")


async def test_fail_with_retry_queues_again_until_attempts_run_out(store: JobStore) -> None:
    s = spec()
    await store.enqueue(s)
    await store.claim("w", 1, 0)
    job = await store.fail(s.id, "transient", retry=True)
    assert job is not None
    assert job.status is JobStatus.QUEUED
    await store.claim("w", 1, 0)
    job = await store.fail(s.id, "transient again", retry=True)
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert job.error == "transient again"


async def test_a_failing_job_whose_cancel_was_asked_is_not_retried(store: JobStore) -> None:
    s = spec()
    await store.enqueue(s)
    await store.claim("w", 1, 0)
    await store.cancel(s.id)  # running: it is cancelled when its run ends, however it ends
    job = await store.fail(s.id, "transient", retry=True)
    assert job is not None
    assert job.status is JobStatus.CANCELLED
    assert job.error == "transient"
    assert await store.claim("w", 1, 0) == []  # nobody runs it again for a client who left
    assert await store.queue_depth() == 0
    counts = await store.counts()
    assert counts.get("jobs_cancelled") == 1
    assert "jobs_retried" not in counts


async def test_a_cancelled_job_whose_worker_died_is_not_run_again(short: JobStore) -> None:
    s = spec()
    await short.enqueue(s)
    await short.claim("w1", 1, 0)
    await short.cancel(s.id)
    await asyncio.sleep(PAUSE)  # w1's lease runs out
    assert await short.claim("w2", 1, 0) == []
    job = await short.get(s.id)
    assert job is not None
    assert job.status is JobStatus.CANCELLED
    assert await short.queue_depth() == 0


async def test_a_failing_job_is_retried_only_while_it_runs(store: JobStore) -> None:
    s = spec()
    await store.enqueue(s)
    job = await store.fail(s.id, "a worker that no longer holds it", retry=True)
    assert job is not None
    assert job.status is JobStatus.QUEUED  # left alone: not running, so not this worker's
    assert [c.id for c in await store.claim("w", 1, 0)] == [s.id]


async def test_fail_without_retry_is_final(store: JobStore) -> None:
    s = spec()
    await store.enqueue(s)
    await store.claim("w", 1, 0)
    job = await store.fail(s.id, "not an image", retry=False)
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert await store.complete(s.id, answer()) is False
    assert await store.claim("w", 1, 0) == []


async def test_finished_jobs_expire_but_queued_ones_never(short: JobStore) -> None:
    done, waiting = spec(), spec()
    await short.enqueue(done)
    await short.claim("w", 1, 0)
    await short.complete(done.id, answer())
    await short.enqueue(waiting)
    await asyncio.sleep(PAUSE)
    assert await short.get(done.id) is None
    await short.purge_expired()
    assert await short.get(done.id) is None
    assert await short.get(waiting.id) is not None
    assert await short.queue_depth() == 1


async def test_jobs_survive_closing_and_reopening(factory: StoreFactory) -> None:
    first = await _opened(factory, LONG)
    s = spec()
    await first.enqueue(s)
    await first.close()
    second = await _opened(factory, LONG)
    try:
        (claim,) = await second.claim("w", 1, 0)
        assert claim.id == s.id
        assert claim.image == s.image
    finally:
        await second.close()


async def test_concurrent_claims_never_share_a_job(store: JobStore) -> None:
    ids = set()
    for _ in range(20):
        s = spec()
        ids.add(s.id)
        await store.enqueue(s)
    batches = await asyncio.gather(*(store.claim(f"w{i}", 3, 0) for i in range(10)))
    claimed = [c.id for batch in batches for c in batch]
    assert len(claimed) == len(set(claimed)) == 20
    assert set(claimed) == ids


async def test_claim_waits_for_a_job_enqueued_meanwhile(
    store: JobStore, factory: StoreFactory
) -> None:
    producer = await _opened(factory, LONG)  # a second client, as a proxy beside the worker
    try:
        s = spec()
        waiting = asyncio.create_task(store.claim("w", 1, 30.0))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await producer.enqueue(s)
        claims = await asyncio.wait_for(waiting, 10.0)
        assert [c.id for c in claims] == [s.id]
    finally:
        await producer.close()


@pytest.mark.parametrize("after_s", [0.0, 0.001, 0.01, 0.2])
async def test_a_waiting_claim_ends_once_told_and_leases_nothing(
    store: JobStore, after_s: float
) -> None:
    """A worker told to stop had sat out its claim's wait (a Redis block of up to 2.5 s). The
    short delays land on the moments before and as a blocking read reaches the server."""
    assert await claim_told_to_stop(store, after_s, within_s=1.0) == []
    s = spec()
    await store.enqueue(s)
    assert [c.id for c in await store.claim("w2", 1, 30.0)] == [s.id]


async def test_a_claim_told_to_stop_still_takes_the_jobs_already_queued(store: JobStore) -> None:
    s = spec()
    await store.enqueue(s)
    until = asyncio.Event()
    until.set()
    assert [c.id for c in await store.claim("w", 2, 30.0, until=until)] == [s.id]


async def test_heartbeats_tell_which_models_are_served(store: JobStore) -> None:
    await store.beat("w1", "accurate")
    assert await store.live_models(60.0) == {"accurate"}
    await asyncio.sleep(PAUSE)
    assert await store.live_models(PAUSE / 2) == set()


async def test_a_purge_forgets_workers_gone_for_an_hour(store: JobStore) -> None:
    """Each restart brings a worker back under a new id; the old ones piled up on Redis."""
    await OLD_WORKER[type(store)](store, "gone", "old model", time.time() - 2 * 3600)
    await OLD_WORKER[type(store)](store, "quiet", "model", time.time() - 1800)
    await store.beat("w", "model")
    assert await store.live_models(3 * 3600) == {"old model", "model"}
    await store.purge_expired()
    assert await store.live_models(3 * 3600) == {"model"}


async def test_ping_succeeds_on_an_open_store(store: JobStore) -> None:
    await store.ping()


async def test_a_full_queue_refuses_and_stores_nothing(factory: StoreFactory) -> None:
    bounded = await _opened(factory, replace(LONG, max_queue_length=2))
    try:
        await bounded.enqueue(spec())
        await bounded.enqueue(spec())
        refused = spec()
        with pytest.raises(QueueFull):
            await bounded.enqueue(refused)
        assert await bounded.get(refused.id) is None
        assert await bounded.queue_depth() == 2
        # Finishing a job makes room again.
        (claim,) = await bounded.claim("w", 1, 0)
        await bounded.complete(claim.id, answer())
        await bounded.enqueue(refused)
        assert await bounded.queue_depth() == 2
    finally:
        await bounded.close()


def owned(owner: str | None = "a") -> JobSpec:
    return replace(spec(), owner=owner)


async def _refuses(store: JobStore, owner: str = "a") -> bool:
    """Whether `owner`'s next job is refused for its share; a job taken is cancelled again."""
    try:
        job = await store.enqueue(owned(owner))
    except TooManyQueued:
        return True
    await store.cancel(job.id)
    return False


async def test_a_job_keeps_its_owner(factory: StoreFactory) -> None:
    store = await _opened(factory, LONG)
    try:
        mine, nobody_s = owned("alice"), owned(None)
        assert (await store.enqueue(mine)).owner == "alice"
        await store.enqueue(nobody_s)
        assert (await store.get(mine.id)).owner == "alice"  # type: ignore[union-attr]
        assert (await store.get(nobody_s.id)).owner is None  # type: ignore[union-attr]
        (claim, _) = await store.claim("w", 2, 0)
        assert claim.job.owner == "alice"
    finally:
        await store.close()


async def test_an_owner_past_its_share_is_refused_and_the_others_are_not(
    factory: StoreFactory,
) -> None:
    shared = await _opened(factory, replace(LONG, max_queued_per_owner=2))
    try:
        first = await shared.enqueue(owned())
        await shared.enqueue(owned())
        refused = owned()
        with pytest.raises(TooManyQueued) as caught:
            await shared.enqueue(refused)
        assert caught.value.details["limit"] == 2
        assert await shared.get(refused.id) is None
        # Another key, and a job with none, are not held by this key's share.
        await shared.enqueue(owned("b"))
        await shared.enqueue(owned(None))
        # The same job again is no new job: answered, not refused.
        assert (await shared.enqueue(replace(owned(), id=first.id))).id == first.id
        assert await shared.queue_depth() == 4
    finally:
        await shared.close()


async def test_an_owner_racing_through_two_proxies_gets_no_more_than_its_share(
    factory: StoreFactory,
) -> None:
    """The share is checked and taken in one atomic step: two proxies each reading the count
    before either wrote it would both take the last place."""
    stores = [await _opened(factory, replace(LONG, max_queued_per_owner=5)) for _ in range(2)]
    try:
        outcomes = await asyncio.gather(
            *(stores[i % 2].enqueue(owned()) for i in range(20)), return_exceptions=True
        )
        assert sum(not isinstance(o, BaseException) for o in outcomes) == 5
        assert all(isinstance(o, TooManyQueued) for o in outcomes if isinstance(o, Exception))
        assert await stores[0].queue_depth() == 5
    finally:
        for store in stores:
            await store.close()


async def test_every_way_a_job_finishes_gives_its_owner_s_place_back(
    factory: StoreFactory,
) -> None:
    shared = await _opened(factory, replace(LONG, max_queued_per_owner=1))
    try:
        await shared.enqueue(owned())
        assert await _refuses(shared)
        (claim,) = await shared.claim("w", 1, 0)
        await shared.complete(claim.id, answer())

        cancelled = await shared.enqueue(owned())
        assert await _refuses(shared)
        await shared.cancel(cancelled.id)

        failed = await shared.enqueue(owned())
        assert await shared.claim("w", 1, 0)
        await shared.fail(failed.id, "again", retry=True)  # queued again: still unfinished
        assert await _refuses(shared)
        assert await shared.claim("w", 1, 0)
        await shared.fail(failed.id, "for good", retry=False)

        running = await shared.enqueue(owned())
        assert await shared.claim("w", 1, 0)
        await shared.cancel(running.id)  # asked while it runs: it ends when its run does
        assert await _refuses(shared)
        await shared.complete(running.id, answer())
        assert not await _refuses(shared)
    finally:
        await shared.close()


async def test_a_job_failed_for_its_lost_workers_gives_its_owner_s_place_back(
    factory: StoreFactory,
) -> None:
    shared = await _opened(factory, replace(SHORT, max_queued_per_owner=1))
    try:
        job = await shared.enqueue(owned())
        for _ in range(SHORT.max_attempts):
            assert await shared.claim("w", 1, 0)
            await asyncio.sleep(PAUSE)  # the worker died: its lease runs out
        assert await shared.claim("w", 1, 0) == []  # out of attempts: failed by this claim
        assert (await shared.get(job.id)).status == JobStatus.FAILED  # type: ignore[union-attr]
        assert not await _refuses(shared)
    finally:
        await shared.close()


async def test_owners_are_counted_with_no_share_set_and_across_a_reopen(
    factory: StoreFactory,
) -> None:
    unshared = await _opened(factory, LONG)
    await unshared.enqueue(owned())
    await unshared.enqueue(owned())
    await unshared.close()
    shared = await _opened(factory, replace(LONG, max_queued_per_owner=2))
    try:
        assert await _refuses(shared)
        assert not await _refuses(shared, "b")
    finally:
        await shared.close()


async def test_an_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    first = await store.enqueue(replace(spec(), idempotency_key="client-retry-1"))
    again = await store.enqueue(replace(spec(), idempotency_key="client-retry-1"))
    other = await store.enqueue(replace(spec(), idempotency_key="client-retry-2"))
    assert again.id == first.id
    assert other.id != first.id
    assert await store.queue_depth() == 2


async def test_retries_racing_with_one_key_through_two_proxies_get_one_job(
    factory: StoreFactory,
) -> None:
    """A client retrying while its first request is still in flight, through another proxy
    behind the load balancer: each store's enqueue must be atomic, not read-then-write."""
    stores = [await _opened(factory, LONG) for _ in range(2)]
    try:
        jobs = await asyncio.gather(
            *(
                stores[i % 2].enqueue(replace(spec(), id=new_job_id(), idempotency_key="race"))
                for i in range(20)
            )
        )
        assert len({job.id for job in jobs}) == 1
        assert await stores[0].queue_depth() == 1
    finally:
        for store in stores:
            await store.close()


async def test_an_idempotency_key_stands_for_its_job_until_the_job_expires(
    short: JobStore,
) -> None:
    """The key had lasted the result TTL from its first request: a retry after a backlog
    longer than that (minutes, with a short TTL) queued the same image a second time."""
    keyed = replace(spec(), idempotency_key="order-9")
    first = await short.enqueue(keyed)
    await asyncio.sleep(PAUSE)  # the TTL runs out while the job still waits
    await short.purge_expired()
    waited = await short.enqueue(replace(keyed, id=new_job_id()))
    assert waited.id == first.id
    assert await short.queue_depth() == 1
    await short.claim("w", 1, 0)
    await short.complete(first.id, answer())
    await asyncio.sleep(PAUSE)  # the finished job expires, and its key with it
    await short.purge_expired()
    after = await short.enqueue(replace(keyed, id=new_job_id()))
    assert after.id != first.id
    assert after.status is JobStatus.QUEUED


async def test_an_idempotency_key_counts_within_its_scope(store: JobStore) -> None:
    """Two clients (API keys) may pick the same key: each gets its own job, and its own back."""
    mine = await store.enqueue(replace(spec(), idempotency_key="order-1", owner="a"))
    theirs = await store.enqueue(replace(spec(), idempotency_key="order-1", owner="b"))
    unscoped = await store.enqueue(replace(spec(), idempotency_key="order-1"))
    assert len({mine.id, theirs.id, unscoped.id}) == 3
    again = await store.enqueue(replace(spec(), idempotency_key="order-1", owner="a"))
    assert again.id == mine.id
    assert await store.queue_depth() == 3


async def test_a_keyed_job_keeps_the_fingerprint_a_retry_is_checked_against(
    store: JobStore,
) -> None:
    first = await store.enqueue(replace(spec(), idempotency_key="k", fingerprint="image-a"))
    again = await store.enqueue(replace(spec(), idempotency_key="k", fingerprint="image-b"))
    assert first.fingerprint == again.fingerprint == "image-a"  # the stored job's, not the retry's
    stored = await store.get(first.id)
    assert stored is not None
    assert stored.fingerprint == "image-a"


async def test_cancelling_a_queued_job_removes_it_from_the_queue(store: JobStore) -> None:
    s = spec()
    await store.enqueue(s)
    job = await store.cancel(s.id)
    assert job is not None
    assert job.status is JobStatus.CANCELLED
    assert await store.claim("w", 1, 0) == []
    assert await store.queue_depth() == 0


async def test_a_running_job_cancelled_finishes_marked_cancelled(store: JobStore) -> None:
    s = spec()
    await store.enqueue(s)
    await store.claim("w", 1, 0)
    job = await store.cancel(s.id)
    assert job is not None
    assert job.status is JobStatus.RUNNING
    assert job.cancel_requested
    assert await store.complete(s.id, answer()) is True
    job = await store.get(s.id)
    assert job is not None
    assert job.status is JobStatus.CANCELLED
    assert job.result == answer()


async def test_cancel_leaves_finished_and_unknown_jobs_alone(store: JobStore) -> None:
    s = spec()
    await store.enqueue(s)
    await store.claim("w", 1, 0)
    await store.complete(s.id, answer())
    job = await store.cancel(s.id)
    assert job is not None
    assert job.status is JobStatus.DONE
    assert await store.cancel(new_job_id()) is None


async def test_complete_many_stores_a_batch_once(store: JobStore) -> None:
    specs = [spec() for _ in range(3)]
    for s in specs:
        await store.enqueue(s)
    await store.claim("w", 3, 0)
    await store.complete(specs[0].id, answer("first"))
    completed = await store.complete_many({s.id: answer(f"batch {i}") for i, s in enumerate(specs)})
    assert completed.stored == {specs[1].id, specs[2].id}
    jobs = [await store.get(s.id) for s in specs]
    assert [j.result.label if j and j.result else None for j in jobs] == [
        "first",
        "batch 1",
        "batch 2",
    ]
    assert await store.queue_depth() == 0


# -- counters ------------------------------------------------------------------------------------


async def test_counters_add_up_and_start_at_nothing(store: JobStore) -> None:
    assert await store.counts() == {}
    await store.add_counts({"seen:3": 2, "seen:9": 1})
    await store.add_counts({"seen:3": 5})
    assert await store.counts() == {"seen:3": 7, "seen:9": 1}


async def test_each_outcome_is_counted_once_with_its_tally(store: JobStore) -> None:
    done, failed, cancelled = [await store.enqueue(spec()) for _ in range(3)]
    claims = await store.claim("w1", 2, 0)
    assert {c.id for c in claims} == {done.id, failed.id}
    tallies = {done.id: ["judged:7", "agree:7"]}
    await store.complete_many({done.id: answer("a")}, tallies)
    await store.complete_many({done.id: answer("again")}, tallies)  # a duplicate counts nothing
    await store.fail(failed.id, "boom", retry=False)
    await store.cancel(cancelled.id)
    counts = await store.counts()
    assert counts == {
        "jobs_done": 1,
        "jobs_failed": 1,
        "jobs_cancelled": 1,
        "judged:7": 1,
        "agree:7": 1,
    }


async def test_a_retry_is_counted_and_a_late_cancel_counts_as_cancelled(store: JobStore) -> None:
    job = await store.enqueue(spec())
    (claim,) = await store.claim("w1", 1, 0)
    await store.fail(claim.id, "transient", retry=True)
    (claim,) = await store.claim("w1", 1, 0)
    await store.cancel(job.id)  # running: finishes, marked cancelled
    await store.complete_many({job.id: answer("late")}, {job.id: ["judged:1"]})
    counts = await store.counts()
    assert counts["jobs_retried"] == 1
    assert counts["jobs_cancelled"] == 1
    assert "jobs_done" not in counts
    assert counts["judged:1"] == 1  # the accurate answer was stored, so it was judged


async def test_counters_survive_a_reopen(factory: StoreFactory) -> None:
    first = await _opened(factory, LONG)
    await first.add_counts({"seen:5": 3})
    await first.close()
    again = await _opened(factory, LONG)
    try:
        assert await again.counts() == {"seen:5": 3}
    finally:
        await again.close()


# -- watching ------------------------------------------------------------------------------------


async def _woken_by(store: JobStore, job_id: str, change: Callable[[], Any]) -> None:
    """Watch the job, make the change, and require the watch to wake long before its timeout."""
    async with store.watch(job_id) as watch:
        assert store.watchers == 1
        waiting = asyncio.create_task(watch.wait(timeout=60.0))
        await asyncio.sleep(0.2)  # the Redis store subscribes in the background
        await change()
        await asyncio.wait_for(waiting, timeout=10.0)
    assert store.watchers == 0


async def test_a_watch_wakes_on_each_change(store: JobStore) -> None:
    job = await store.enqueue(spec())

    async def claim() -> None:
        assert await store.claim("w1", 1, 0)

    await _woken_by(store, job.id, claim)
    await _woken_by(store, job.id, lambda: store.complete(job.id, answer()))
    assert (await store.get(job.id)).status is JobStatus.DONE  # type: ignore[union-attr]


async def test_a_watch_wakes_on_a_change_made_by_another_process(
    store: JobStore, factory: StoreFactory
) -> None:
    job = await store.enqueue(spec())
    other = await _opened(factory, LONG)  # as another proxy or worker would
    try:
        await _woken_by(store, job.id, lambda: other.cancel(job.id))
    finally:
        await other.close()
    assert (await store.get(job.id)).status is JobStatus.CANCELLED  # type: ignore[union-attr]


async def test_a_watch_sleeps_out_its_timeout_while_nothing_changes(store: JobStore) -> None:
    """SQLite woke every watch every 0.5 s to look for other processes' writes: a store read
    per open stream twice a second, with nothing to find."""
    job = await store.enqueue(spec())
    await store.attach_fast(job.id, answer("fast"))  # this process's own writes, lazy or not
    await store.enqueue(spec())
    async with store.watch(job.id) as watch:
        await watch.wait(timeout=0.5)  # Redis wakes a new subscriber once: it may have missed some
        started = time.monotonic()
        await watch.wait(timeout=1.6)
        assert time.monotonic() - started >= 1.5


async def test_oldest_unfinished_is_the_first_queued_until_it_finishes(store: JobStore) -> None:
    assert await store.oldest_unfinished_at() is None
    before = time.time()
    first = await store.enqueue(spec())
    await asyncio.sleep(0.05)
    await store.enqueue(spec())
    oldest = await store.oldest_unfinished_at()
    assert oldest is not None
    assert before - 1.0 <= oldest <= first.created_at + 0.01
    await store.claim("w1", 1, 0)
    assert await store.oldest_unfinished_at() == oldest  # running still counts
    await store.complete(first.id, answer())
    later = await store.oldest_unfinished_at()
    assert later is not None
    assert later > oldest


# -- webhooks ------------------------------------------------------------------------------------


async def test_the_callback_and_its_delivery_state_are_kept(store: JobStore) -> None:
    s = replace(spec(), callback_url="http://127.0.0.1:9/hook")
    job = await store.enqueue(s)
    assert job.callback_url == "http://127.0.0.1:9/hook"
    assert job.webhook is None
    await store.claim("w1", 1, 0)
    await store.complete(job.id, answer())
    pending = Delivery(DeliveryState.PENDING, attempts=1, last_error="HTTP 503", updated_at=1.5)
    await store.record_delivery(job.id, pending)
    assert (await store.get(job.id)).webhook == pending  # type: ignore[union-attr]
    delivered = Delivery(DeliveryState.DELIVERED, attempts=2, updated_at=2.5)
    await store.record_delivery(job.id, delivered)
    found = await store.get(job.id)
    assert found is not None
    assert found.webhook == delivered
    assert found.result == answer()


async def test_a_delivery_to_a_gone_job_is_ignored(store: JobStore) -> None:
    ghost = new_job_id()
    await store.record_delivery(ghost, Delivery(DeliveryState.FAILED, attempts=1))
    assert await store.get(ghost) is None


async def test_a_traced_job_keeps_its_trace_context_through_its_claim(store: JobStore) -> None:
    context = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    job = await store.enqueue(replace(spec(), trace=context))
    assert job.trace == context
    untraced = await store.enqueue(spec())
    await store.attach_fast(job.id, answer())  # rewrites the metadata around it
    before = time.time()
    first, second = await store.claim("w1", 2, 0)
    assert (first.job.trace, second.job.trace) == (context, None)
    assert second.id == untraced.id
    # A worker's span starts at the claim: the claimed job's updated_at is when it was taken.
    assert first.job.updated_at >= before


# -- the fast answer, added after the job ---------------------------------------------------------


async def test_a_fast_answer_is_added_once_to_a_job_stored_without_one(store: JobStore) -> None:
    job = await store.enqueue(spec())
    assert job.fast is None
    assert await store.attach_fast(job.id, answer("first")) is None  # no result to report yet
    assert await store.attach_fast(job.id, answer("second")) is None  # the first answer stays
    found = await store.get(job.id)
    assert found is not None
    assert found.fast == answer("first")
    assert found.request_id == "req-1"  # the rest of the metadata is kept
    (claim,) = await store.claim("w1", 1, 0)
    assert claim.job.fast == answer("first")


async def test_adding_a_fast_answer_to_a_gone_job_stores_nothing(store: JobStore) -> None:
    ghost = new_job_id()
    assert await store.attach_fast(ghost, answer()) is None
    assert await store.get(ghost) is None


async def test_a_fast_answer_that_arrives_after_the_result_reports_it(store: JobStore) -> None:
    job = await store.enqueue(spec())
    await store.claim("w1", 1, 0)
    completed = await store.complete_many({job.id: answer("accurate")})
    assert completed == Completed(frozenset({job.id}), untallied=frozenset())
    # The worker could not judge: the proxy, writing second, learns the result and owes it.
    assert await store.attach_fast(job.id, answer("fast")) == answer("accurate")
    assert await store.attach_fast(job.id, answer("again")) is None


async def test_a_result_stored_after_an_unseen_fast_answer_is_reported_untallied(
    store: JobStore,
) -> None:
    late, seen = await store.enqueue(spec()), await store.enqueue(spec())
    claims = await store.claim("w1", 2, 0)
    assert all(c.job.fast is None for c in claims)  # read before the fast answers arrived
    for job in (late, seen):
        assert await store.attach_fast(job.id, answer("fast")) is None
    results = {late.id: answer("a"), seen.id: answer("b")}
    completed = await store.complete_many(results, {seen.id: ["judged:9"]})
    assert completed.stored == {late.id, seen.id}
    assert completed.untallied == {late.id}  # `seen` came with its tally
    again = await store.complete_many(results)  # a duplicate is neither stored nor owed
    assert again == Completed(frozenset())


async def test_an_added_fast_answer_survives_a_reopen(factory: StoreFactory) -> None:
    first = await _opened(factory, LONG)
    job = await first.enqueue(spec())
    await first.attach_fast(job.id, answer("kept"))
    await first.close()
    again = await _opened(factory, LONG)
    try:
        found = await again.get(job.id)
        assert found is not None
        assert found.fast == answer("kept")
    finally:
        await again.close()


# -- webhooks no worker is delivering -----------------------------------------------------------


def hooked() -> JobSpec:
    return replace(spec(), callback_url="https://hooks.example.com/tandem")


async def test_a_finished_job_with_a_callback_awaits_delivery_until_it_is_done(
    store: JobStore,
) -> None:
    done, plain, waiting = hooked(), spec(), hooked()
    for s in (done, plain, waiting):
        await store.enqueue(s)
    await store.claim("w", 2, 0)
    await store.complete_many({done.id: answer(), plain.id: answer()})
    later = time.time() + 60
    # Finished with a callback, never tried; not the one without, nor the one still queued.
    assert [job.id for job in await store.undelivered(later, 10)] == [done.id]
    assert await store.undelivered(time.time() - 60, 10) == []  # finished after that
    await store.record_delivery(done.id, Delivery(DeliveryState.DELIVERED, 1, None, time.time()))
    assert await store.undelivered(later, 10) == []


async def test_a_delivery_left_pending_is_offered_again_once_stale(store: JobStore) -> None:
    failed, cancelled = hooked(), hooked()
    await store.enqueue(failed)
    await store.enqueue(cancelled)
    await store.claim("w", 1, 0)
    await store.fail(failed.id, "not an image", retry=False)
    await store.cancel(cancelled.id)  # queued: cancelled at once, by no worker
    now = time.time()
    await store.record_delivery(failed.id, Delivery(DeliveryState.PENDING, 2, "HTTP 503", now))
    # In progress at `now`: only a later sweep takes it up.
    assert [job.id for job in await store.undelivered(now, 10)] == [cancelled.id]
    later = await store.undelivered(now + 60, 10)
    assert {job.id for job in later} == {failed.id, cancelled.id}
    (resumed,) = [job for job in later if job.id == failed.id]
    assert resumed.webhook == Delivery(DeliveryState.PENDING, 2, "HTTP 503", now)
    assert len(await store.undelivered(now + 60, 1)) == 1


# -- records this version cannot read -----------------------------------------------------------

HOOK = "https://hooks.example.com/tandem"
UNREADABLE = {
    "newer": '{"v": 2, "callback_url": "' + HOOK + '"}',  # a later payload version
    "damaged": '{"v": 1, "callback_url": "' + HOOK + '", "fa',  # cut short
}


@pytest.mark.parametrize("meta", sorted(UNREADABLE))
async def test_a_claim_fails_a_job_it_cannot_read_and_hands_out_the_others(
    store: JobStore, meta: str
) -> None:
    """One unreadable record at the head of the queue stopped every worker that met it."""
    bad, good = hooked(), spec()
    await store.enqueue(bad)
    await store.enqueue(good)
    await OVERWRITE_META[type(store)](store, bad.id, UNREADABLE[meta])
    assert [claim.id for claim in await store.claim("w", 10, 0)] == [good.id]
    assert await store.claim("w", 10, 0) == []  # finished: never handed out again
    assert await store.queue_depth() == 1  # the good one, running
    assert (await store.counts()).get("jobs_failed") == 1
    with pytest.raises(UnreadableJob) as raised:
        await store.get(bad.id)
    assert raised.value.details == {"job_id": bad.id}


@pytest.mark.parametrize("meta", sorted(UNREADABLE))
async def test_a_fast_answer_leaves_a_record_it_cannot_read_as_it_is(
    store: JobStore, meta: str
) -> None:
    """A newer version's record is not rewritten by this one: it raises, typed."""
    job = await store.enqueue(hooked())
    await OVERWRITE_META[type(store)](store, job.id, UNREADABLE[meta])
    with pytest.raises(UnreadableJob) as raised:
        await store.attach_fast(job.id, answer())
    assert raised.value.details == {"job_id": job.id}
    assert [claim.id for claim in await store.claim("w", 10, 0)] == []  # failed, unread
    assert (await store.counts()).get("jobs_failed") == 1


async def test_a_claim_fails_a_job_whose_image_is_missing(store: JobStore) -> None:
    lost, good = spec(), spec()
    await store.enqueue(lost)
    await store.enqueue(good)
    await DROP_IMAGE[type(store)](store, lost.id)
    assert [claim.id for claim in await store.claim("w", 10, 0)] == [good.id]
    job = await store.get(lost.id)
    assert job is not None
    assert (job.status, job.error, job.attempts) == (JobStatus.FAILED, MISSING_IMAGE, 0)
    assert await store.claim("w", 10, 0) == []


@pytest.mark.parametrize("meta", sorted(UNREADABLE))
async def test_undelivered_leaves_out_a_job_it_cannot_read(store: JobStore, meta: str) -> None:
    bad, good = hooked(), hooked()
    for s in (bad, good):
        await store.enqueue(s)
    await store.claim("w", 2, 0)
    await store.complete_many({bad.id: answer(), good.id: answer()})
    await OVERWRITE_META[type(store)](store, bad.id, UNREADABLE[meta])
    assert [job.id for job in await store.undelivered(time.time() + 60, 10)] == [good.id]
