"""What only the Redis store meets: its queue is a stream that other clients of the server can
write to. The behaviour every store shares is in test_store_contract.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tandem.jobs.records import JobSpec, new_job_id
from tandem.jobs.redis import RedisJobStore
from tests.support import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisJobStore]:
    store = RedisJobStore(redis_server.url, prefix=f"only-redis-{new_job_id()[:8]}")
    await store.open()
    yield store
    await store.close()


async def test_a_stream_entry_naming_no_job_is_dropped_not_fatal(store: RedisJobStore) -> None:
    """An entry some other client added to the queue's stream, without a job id, raised
    KeyError out of every claim that met it."""
    await store._client.xadd(store._queue, {"something": "else"})
    good = JobSpec(id=new_job_id(), image=b"\xff\xd8 image")
    await store.enqueue(good)
    assert [claim.id for claim in await store.claim("w", 10, 0)] == [good.id]
    assert await store.queue_depth() == 1  # the foreign entry is gone; the good one is running
