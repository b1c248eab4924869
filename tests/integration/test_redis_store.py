"""What only the Redis store meets: its queue is a stream that other clients of the server can
write to. The behaviour every store shares is in test_store_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme
from redis import asyncio as aioredis
from redis.exceptions import MasterDownError, OutOfMemoryError, ResponseError

from tandem.errors import QueueUnavailable
from tandem.jobs.records import JobSpec, new_job_id
from tandem.jobs.redis import RedisJobStore, Replication, refuses_writes, scripts
from tandem.jobs.redis.connect import Sentinels
from tandem.jobs.redis.store import LONGEST_BLOCK_S
from tandem.predictions import Prediction, Scored
from tests.support import (
    RedisSentinel,
    RedisServer,
    claim_told_to_stop,
    free_cluster_port,
    free_port,
)


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


async def test_an_idempotency_key_expires_with_its_finished_job_not_before(
    store: RedisJobStore,
) -> None:
    """Kept without an expiry while its job waits, so that no backlog outlasts it; given the
    job's once the job finishes, so that keys do not pile up in Redis."""
    keyed = JobSpec(id=new_job_id(), image=b"\xff\xd8 image", idempotency_key="order-3")
    await store.enqueue(keyed)
    key = f"{store._prefix}:idempotency:order-3"
    assert await store._client.pttl(key) == -1  # no expiry
    await store.claim("w", 1, 0)
    await store.complete(keyed.id, Prediction("m", (Scored(1, "a", 0.9),), 1.0))
    job_ttl = await store._client.pttl(store._job_key(keyed.id))
    assert 0 < await store._client.pttl(key) <= job_ttl


async def test_more_calls_at_once_than_connections_wait_for_one_not_fail(
    store: RedisJobStore,
) -> None:
    """redis-py's pool refused a call past its 100 connections at once: a proxy's 300 reads
    of jobs at once (a thousand watchers woken together, say) got 200 errors (503s)."""
    await store.enqueue(job := JobSpec(id=new_job_id(), image=b"\xff\xd8 image"))
    read = await asyncio.gather(*(store.get(job.id) for _ in range(300)))
    assert [found.id if found else None for found in read] == [job.id] * 300


async def test_a_purge_forgets_the_consumers_of_gone_workers_that_hold_nothing(
    store: RedisJobStore,
) -> None:
    """A consumer in the group per worker id, for good: a deployment that restarts workers
    piled them up. One that still holds an entry keeps it, for XAUTOCLAIM to take over."""
    held = JobSpec(id=new_job_id(), image=b"\xff\xd8 image")
    await store.enqueue(held)
    assert len(await store.claim("gone, holding a job", 1, 0)) == 1
    await store._client.xgroup_createconsumer(store._queue, "workers", "gone")
    await store.beat("live", "model")
    await store._client.xgroup_createconsumer(store._queue, "workers", "live")
    await store.purge_expired()
    consumers = await store._client.xinfo_consumers(store._queue, "workers")
    assert sorted(c["name"] for c in consumers) == [b"gone, holding a job", b"live"]


async def test_a_replica_refuses_as_unavailable_and_takes_jobs_once_promoted(
    tmp_path: Path,
) -> None:
    """After a failover the old primary may come back as a replica, which answers writes with
    READONLY: that was a 500 without the fast answer for a client, and it stopped a worker."""
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    store = RedisJobStore(server.url, prefix="replica")
    admin = aioredis.Redis.from_url(server.url)
    try:
        await store.open()
        await admin.replicaof("127.0.0.1", str(free_port()))  # a primary that never answers
        job = JobSpec(id=new_job_id(), image=b"\xff\xd8 image")
        with pytest.raises(QueueUnavailable, match="read only replica"):
            await store.enqueue(job)
        with pytest.raises(QueueUnavailable, match="read only replica"):
            await store.ping()  # a PING alone said the queue was fine
        with pytest.raises(QueueUnavailable, match="read only replica"):
            await store.beat("w", "model")
        await admin.replicaof("NO", "ONE")
        await store.ping()
        assert (await store.enqueue(job)).id == job.id
    finally:
        await store.close()
        await admin.aclose()
        server.stop()


class MovingAddress:
    """One address for a Redis whose server changes, as a DNS name or a virtual IP moves to the
    new primary after a failover: new connections go to the current target, while those made
    before stay with the server they reached."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> MovingAddress:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def test_after_a_failover_behind_one_address_the_store_reaches_the_new_primary(
    tmp_path: Path,
) -> None:
    """A pooled connection stayed with the old primary, now a replica: every write was refused
    (READONLY), the proxy's every job a 503 and the worker's every answer lost, until a
    restart. Such a connection is now closed and the command sent again on a new one."""
    old, new = (RedisServer(tmp_path / name, appendonly=False).start() for name in "ab")
    admin_old, admin_new = aioredis.Redis(port=old.port), aioredis.Redis(port=new.port)
    await admin_new.replicaof("127.0.0.1", str(old.port))
    async with MovingAddress(old.port) as address:
        proxy, worker = (
            RedisJobStore(f"redis://127.0.0.1:{address.port}/0", prefix="failover")
            for _ in range(2)
        )
        try:
            for store in (proxy, worker):
                await store.open()
            before = JobSpec(id=new_job_id(), image=b"\xff\xd8 before")
            await proxy.enqueue(before)
            assert [claim.id for claim in await worker.claim("w", 2, 0)] == [before.id]
            assert await admin_old.wait(1, 5000) == 1  # the replica has it all
            await admin_new.replicaof("NO", "ONE")  # the failover
            await admin_old.replicaof("127.0.0.1", str(new.port))
            address.target = new.port
            after = JobSpec(id=new_job_id(), image=b"\xff\xd8 after")
            assert (await proxy.enqueue(after)).id == after.id  # a script
            assert await worker.complete(before.id, ANSWER)  # a pipeline of them
            assert [claim.id for claim in await worker.claim("w", 2, 0)] == [after.id]
            assert await worker.complete(after.id, ANSWER)
            assert await proxy.queue_depth() == 0
            assert await admin_new.hget(f"failover:job:{before.id}", "status") == b"done"
        finally:
            for store in (proxy, worker):
                await store.close()
            await admin_old.aclose()
            await admin_new.aclose()
            old.stop()
            new.stop()


@contextlib.asynccontextmanager
async def primary_and_replicas(
    tmp_path: Path, count: int = 1, tls: trustme.CA | None = None
) -> AsyncIterator[list[RedisServer]]:
    """A redis-server and `count` more replicating it, in sync: the primary first."""
    # Without append-only files: a replica that has just synced rewrites its file, and
    # refuses to shut down meanwhile.
    servers = [
        RedisServer(tmp_path / f"redis{n}", appendonly=False, tls=tls).start()
        for n in range(count + 1)
    ]
    admins = [aioredis.Redis.from_url(server.url) for server in servers[1:]]
    try:
        for admin in admins:
            await admin.replicaof("127.0.0.1", str(servers[0].port))
        for admin in admins:
            await _in_sync(admin)
        await _all_online(servers[0], count)
        yield servers
    finally:
        for admin in admins:
            await admin.aclose()
        for server in reversed(servers):
            server.stop()


async def _all_online(primary: RedisServer, count: int) -> None:
    """Until a write reaches every replica: a replica's link is up a moment before its
    primary counts it in a WAIT."""
    admin = aioredis.Redis.from_url(primary.url)
    try:
        await admin.set("online", 1)
        async with asyncio.timeout(20):
            while await admin.wait(count, 100) < count:
                pass
    finally:
        await admin.aclose()


async def _in_sync(replica: aioredis.Redis) -> None:
    async with asyncio.timeout(20):
        while True:
            if (await replica.info("replication")).get("master_link_status") == "up":
                return
            await asyncio.sleep(0.05)


async def test_a_job_s_id_goes_out_only_once_the_replicas_have_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis replicates after it answers: a job the primary alone had was lost if it failed
    before its replica had the job and the replica took over, though its id had gone out."""
    async with primary_and_replicas(tmp_path) as (primary, replica):
        store = RedisJobStore(primary.url, prefix="wait", replication=Replication(1, 0.3))
        replica_reads = aioredis.Redis(port=replica.port)
        try:
            await store.open()
            job = await store.enqueue(JobSpec(id=new_job_id(), image=b"\xff\xd8 image"))
            assert await replica_reads.hget(f"wait:job:{job.id}", "status") == b"queued"
            await store.ping()
            replica.pause()  # a replica that no longer confirms what it has
            keyed = JobSpec(id=new_job_id(), image=b"\xff\xd8 image", idempotency_key="k")
            with pytest.raises(QueueUnavailable, match=r"0 of the 1 Redis replicas .* 0\.3 s"):
                await store.enqueue(keyed)
            with pytest.raises(QueueUnavailable, match="0 of the 1 Redis replicas"):
                await store.ping()  # /health/all says the queue takes no jobs
            replica.resume()
            retry = JobSpec(id=new_job_id(), image=b"\xff\xd8 image", idempotency_key="k")
            assert (await store.enqueue(retry)).id == keyed.id  # stored on the primary
        finally:
            replica.resume()
            await store.close()
            await replica_reads.aclose()
        with caplog.at_level(logging.WARNING, logger="tandem.jobs"):
            for wanted in (2, 0, 1):
                checked = RedisJobStore(primary.url, replication=Replication(wanted))
                await checked.open()
                await checked.close()
    assert "has 1 replica(s) connected, and each job must reach 2: until" in caplog.text
    assert "must reach 0 (TANDEM_REDIS_MIN_REPLICAS): a failover loses the" in caplog.text
    assert "must reach 1" not in caplog.text


async def test_no_accepted_job_is_lost_when_its_primary_dies_and_the_replica_takes_over(
    tmp_path: Path,
) -> None:
    async with primary_and_replicas(tmp_path) as (primary, replica):
        store = RedisJobStore(primary.url, prefix="failover", replication=Replication(1))
        try:
            await store.open()
            accepted = []
            for _ in range(8):  # 25 at once, as from as many requests
                specs = [JobSpec(id=new_job_id(), image=b"\xff\xd8 image") for _ in range(25)]
                jobs = await asyncio.gather(*(store.enqueue(spec) for spec in specs))
                accepted += [job.id for job in jobs]
        finally:
            await store.close()
        primary.kill()  # at once: no shutdown, no last write to its replica
        promoted = RedisJobStore(replica.url, prefix="failover")
        admin = aioredis.Redis(port=replica.port)
        try:
            await admin.replicaof("NO", "ONE")
            await promoted.open()
            found = [await promoted.get(job_id) for job_id in accepted]
            assert [job.id for job in found if job is not None] == accepted
            assert await promoted.queue_depth() == len(accepted)
        finally:
            await promoted.close()
            await admin.aclose()


async def test_through_sentinel_the_stores_follow_a_failover_and_lose_no_accepted_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The URL's host names the service; the Sentinel names its primary. The primary dies
    with a job running and others queued: Sentinel promotes a replica and points the other at
    it, and a proxy's and a worker's stores go on with the new primary, every job accepted
    before there, as each reached a replica before its id went out."""
    async with primary_and_replicas(tmp_path, count=2) as (primary, *replicas):
        sentinel = RedisSentinel(tmp_path / "sentinel", primary).start()
        watched = Sentinels((("127.0.0.1", sentinel.port),))
        proxy, worker = (
            RedisJobStore(
                f"redis://{sentinel.service}/0",
                prefix="sentinel",
                replication=Replication(1),
                sentinels=watched,
            )
            for _ in range(2)
        )
        try:
            with caplog.at_level(logging.WARNING, logger="tandem.jobs"):
                for store in (proxy, worker):
                    await store.open()
            assert f"service jobs (Sentinels 127.0.0.1:{sentinel.port})" in caplog.text
            assert "the old primary still up can lose jobs it accepted; set it to 2" in caplog.text
            accepted = [(await proxy.enqueue(_spec())).id for _ in range(20)]
            (running,) = await worker.claim("w", 1, 0)
            async with proxy.watch(running.id):  # the proxy subscribes to the changes
                await _subscribed(worker._client, proxy)
            primary.kill()
            async with asyncio.timeout(60):  # refused (503) until a replica is promoted
                while True:
                    try:
                        accepted.append((await proxy.enqueue(_spec())).id)
                        break
                    except QueueUnavailable:
                        await asyncio.sleep(0.2)
            assert all([await proxy.get(job_id) for job_id in accepted])
            await _subscribed(worker._client, proxy)  # again, on the new primary
            async with proxy.watch(running.id) as watch:
                assert await worker.complete(running.id, ANSWER)
                async with asyncio.timeout(5):  # told by the new primary
                    await watch.wait(timeout=10)
            waiting = await worker.claim("w", 50, 0)
            assert sorted(claim.id for claim in waiting) == sorted(set(accepted) - {running.id})
            roles = [(await _role(replica)) for replica in replicas]
            assert sorted(roles) == ["master", "slave"]
            # One line, where redis-py's text went on with each Sentinel's client in full.
            elsewhere = RedisJobStore("redis://elsewhere/0", sentinels=watched)
            await elsewhere.open()
            with pytest.raises(QueueUnavailable) as refused:
                await elsewhere.ping()
            await elsewhere.close()
            assert str(refused.value) == (
                "Redis is unavailable: No master found for 'elsewhere' by its Sentinels"
            )
        finally:
            for store in (proxy, worker):
                await store.close()
            sentinel.stop()


async def test_through_sentinel_over_tls_with_client_certificates(tmp_path: Path) -> None:
    """TLS alone everywhere, each server asking for the client's certificate: the primary,
    its replica's link and the Sentinel. The URL's TLS options serve the Sentinel and the
    primary alike."""
    ca = trustme.CA()
    async with primary_and_replicas(tmp_path, tls=ca) as (primary, _):
        sentinel = RedisSentinel(tmp_path / "sentinel", primary, tls=ca).start()
        tls_options = urlsplit(primary.url).query
        asked = aioredis.Redis.from_url(f"rediss://127.0.0.1:{sentinel.port}?{tls_options}")
        async with asyncio.timeout(20):  # it reached the primary, over TLS, to learn of it
            while True:
                if await asked.sentinel_slaves(sentinel.service):
                    break
                await asyncio.sleep(0.1)
        await asked.aclose()
        store = RedisJobStore(
            f"rediss://{sentinel.service}/0?{tls_options}",
            prefix="tls",
            replication=Replication(1),  # the replica's link is TLS too
            sentinels=Sentinels((("127.0.0.1", sentinel.port),)),
        )
        try:
            await store.open()
            job = await store.enqueue(_spec())
            assert await store.get(job.id) is not None
            await store.ping()
            assert [c.id for c in await store.claim("w", 1, 0)] == [job.id]
            # A claim's blocking read, on a connection of its own from the Sentinel's pool,
            # is ended by CLIENT UNBLOCK over TLS when the worker is told to stop.
            assert await claim_told_to_stop(store, 0.3, within_s=1.0) == []
        finally:
            await store.close()
            sentinel.stop()


@contextlib.asynccontextmanager
async def _failing_over(
    tmp_path: Path, replicas: int
) -> AsyncIterator[tuple[RedisServer, RedisJobStore, list[aioredis.Redis]]]:
    """A primary, two replicas and two Sentinels, and a store through them that each job must
    reach `replicas` replicas: the old primary, the store, and clients of the Sentinels, to
    call a failover with, while the old primary stays up."""
    async with primary_and_replicas(tmp_path, count=2) as (primary, *_):
        sentinels = [RedisSentinel(tmp_path / f"sentinel{n}", primary).start() for n in (0, 1)]
        store = RedisJobStore(
            "redis://jobs/0",
            prefix="demoted",
            replication=Replication(replicas),
            sentinels=Sentinels(tuple(("127.0.0.1", sentinel.port) for sentinel in sentinels)),
        )
        asked = [aioredis.Redis(port=sentinel.port) for sentinel in sentinels]
        try:
            await store.open()
            for each in asked:
                # Sentinel's timers (Redis 7.0+): the old primary is demoted about 4 s after a
                # failover, not 8 to 16 s.
                await each.execute_command(
                    "SENTINEL", "DEBUG", "info-period", 200, "publish-period", 1000
                )
            # Several connections in the pool, each to the primary.
            await asyncio.gather(*(store.enqueue(_spec()) for _ in range(8)))
            yield primary, store, asked
        finally:
            for each in asked:
                await each.aclose()
            await store.close()
            for sentinel in sentinels:
                sentinel.stop()


async def test_through_sentinel_no_job_is_lost_to_a_primary_that_stays_up(
    tmp_path: Path,
) -> None:
    """A failover with the old primary still up (SENTINEL FAILOVER, or a partition that
    heals): until a Sentinel tells it to follow the new primary, seconds later, it takes
    writes on the connections made to it, and drops them as it resyncs. A replica that
    still follows it confirms them, so only each job on every replica is safe: with 1 of 2,
    164 of 952 jobs accepted were lost."""
    async with _failing_over(tmp_path, replicas=2) as (primary, store, (asked, _)):
        demoted = asyncio.Event()
        sending = [asyncio.create_task(_enqueue_until(store, demoted)) for _ in range(4)]
        await _failover(asked, "jobs")
        await _demoted(primary)
        demoted.set()
        accepted = [job_id for ids in await asyncio.gather(*sending) for job_id in ids]
        assert accepted
        assert all([await store.get(job_id) for job_id in accepted])


async def test_through_sentinel_a_store_leaves_the_old_primary_when_a_sentinel_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its pooled connections still led to the old primary until a Sentinel demoted it and
    closed them: every job meanwhile was refused (its replicas follow the new primary), or,
    with no replica asked for, lost. Its subscription to the jobs' changes, which the
    Sentinel does not close, heard none of them meanwhile."""
    caplog.set_level(logging.WARNING, logger="tandem.jobs")
    async with _failing_over(tmp_path, replicas=1) as (primary, store, (asked, other)):
        watched = await store.enqueue(_spec())
        async with store.watch(watched.id) as watch:
            await _failover(asked, "jobs")
            promoted = await _moved(asked, "jobs", primary.port)
            job_id = await _stored_on(store, promoted)
            new_primary = aioredis.Redis(port=promoted)
            try:
                await _subscribed(new_primary, store)
                assert await _role(primary) == "master"  # not demoted yet
                claimed = await store.claim("w", 50, 0)  # behind the fixture's first jobs
                assert watched.id in {claim.id for claim in claimed}
                assert await store.complete(watched.id, ANSWER)
                async with asyncio.timeout(5):  # told by the new primary
                    await watch.wait(timeout=10)
            finally:
                await new_primary.aclose()
        assert await _moved(other, "jobs", primary.port) == promoted  # it announced it too
        await _demoted(primary)
        assert await store.get(job_id) is not None
    # Each Sentinel announced the failover; the store followed it once.
    assert caplog.text.count("Redis Sentinel failed over: jobs 127.0.0.1") == 1


async def _demoted(primary: RedisServer) -> None:
    """Once a Sentinel has told the old primary to follow the new one."""
    async with asyncio.timeout(60):
        while True:
            if await _role(primary) == "slave":
                return
            await asyncio.sleep(0.1)


async def _moved(asked: aioredis.Redis, service: str, old_port: int) -> int:
    """The port of the primary the Sentinel names for `service`, once not `old_port`."""
    async with asyncio.timeout(30):
        while True:
            _, port = await asked.sentinel_get_master_addr_by_name(service)
            if int(port) != old_port:
                return int(port)
            await asyncio.sleep(0.05)


async def _stored_on(store: RedisJobStore, port: int) -> str:
    """The id of the first job `store` accepts that the server on `port` holds."""
    server = aioredis.Redis(port=port)
    try:
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(QueueUnavailable):
                    job = await store.enqueue(_spec())
                    if await server.exists(store._job_key(job.id)):
                        return job.id
                await asyncio.sleep(0.02)
    finally:
        await server.aclose()


async def _enqueue_until(store: RedisJobStore, done: asyncio.Event) -> list[str]:
    """The ids of the jobs `store` accepted until `done`, one at a time; refusals skipped."""
    accepted = []
    while not done.is_set():
        with contextlib.suppress(QueueUnavailable):
            accepted.append((await store.enqueue(_spec())).id)
        await asyncio.sleep(0.02)
    return accepted


async def _failover(asked: aioredis.Redis, service: str) -> None:
    """SENTINEL FAILOVER, once the Sentinel holds a replica fit to promote."""
    async with asyncio.timeout(30):
        while True:
            try:
                await asked.execute_command("SENTINEL", "FAILOVER", service)
                return
            except ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc):
                    raise
            await asyncio.sleep(0.2)


async def _subscribed(server: aioredis.Redis, store: RedisJobStore) -> None:
    """Once `store`'s subscription to the changes is in place, as `server` sees it."""
    async with asyncio.timeout(30):
        while True:
            [(_, subscribers)] = await server.pubsub_numsub(store._changes)
            if subscribers:
                return
            await asyncio.sleep(0.05)


def _spec() -> JobSpec:
    return JobSpec(id=new_job_id(), image=b"\xff\xd8 image")


async def _role(server: RedisServer) -> str:
    admin = aioredis.Redis(port=server.port)
    try:
        return str((await admin.info("replication"))["role"])
    finally:
        await admin.aclose()


async def test_a_redis_that_may_drop_jobs_is_said_so_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Evicting keys, Redis would drop queued jobs at its memory limit; without an
    append-only file, a restart drops those since its last snapshot. Both go unnoticed."""
    where = await _opened_beside(tmp_path, {"maxmemory-policy": "allkeys-lru"}, appendonly=False)
    assert f"Redis at {where} evicts keys (maxmemory-policy allkeys-lru)" in caplog.text
    assert "keeps no append-only file" in caplog.text


async def test_a_redis_without_a_memory_limit_is_said_so_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis's default: a backlog of images grew it until the system killed it."""
    where = await _opened_beside(tmp_path, {"maxmemory": "0"})
    assert f"Redis at {where} has no memory limit (maxmemory 0)" in caplog.text


async def test_a_redis_without_a_memory_limit_reports_room_without_end(tmp_path: Path) -> None:
    """+Inf on /metrics: such a Redis takes writes until the system kills it (see above)."""
    server = RedisServer(tmp_path / "redis", options=("--maxmemory", "0")).start()
    store = RedisJobStore(server.url, prefix="unbounded")
    try:
        await store.open()
        space = await store.space()
    finally:
        await store.close()
        server.stop()
    assert space is not None
    assert space.room_bytes == math.inf
    assert space.used_bytes > 0


async def _opened_beside(tmp_path: Path, config: dict[str, str], appendonly: bool = True) -> str:
    """Open and close a store on a redis-server of its own, configured so; its address."""
    server = RedisServer(tmp_path / "redis", appendonly=appendonly).start()
    admin = aioredis.Redis.from_url(server.url)
    store = RedisJobStore(server.url, prefix="keeping")
    try:
        for name, value in config.items():
            await admin.config_set(name, value)
        await store.open()
    finally:
        await store.close()
        await admin.aclose()
        server.stop()
    return f"127.0.0.1:{server.port}"


async def test_a_redis_that_keeps_its_jobs_opens_without_a_word(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisJobStore(redis_server.url, prefix=f"quiet-{new_job_id()[:8]}")
    await store.open()
    await store.close()
    assert [r.getMessage() for r in caplog.records if r.name == "tandem.jobs"] == []


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."), True),
        (ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (ResponseError("BUSY Redis is busy running a script."), True),
        (MasterDownError("Link with MASTER is down and replica-serve-stale-data is 'no'."), True),
        (ResponseError("BUSYGROUP Consumer Group name already exists"), False),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (ResponseError("ERR user_script:3: Script attempted to access nonexistent key"), False),
    ],
)
def test_which_replies_are_a_redis_refusing_writes_for_now(
    error: ResponseError, refused: bool
) -> None:
    """Those are QueueUnavailable (503, with the fast answer); any other is a fault to see."""
    assert refuses_writes(error) is refused


@contextlib.asynccontextmanager
async def _user_without(redis_server: RedisServer, *commands: str) -> AsyncIterator[str]:
    """The URL of an ACL user that may run every command but `commands`."""
    async with aioredis.from_url(redis_server.url) as admin:
        await admin.acl_setuser(
            "limited",
            enabled=True,
            passwords=["+pw"],
            categories=["+@all"],
            commands=[f"-{command}" for command in commands],
            keys=["*"],
            channels=["*"],
        )
        try:
            yield redis_server.url.replace("redis://", "redis://limited:pw@")
        finally:
            await admin.acl_deluser("limited")


@contextlib.asynccontextmanager
async def _protected_mode(tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a Redis in protected mode (no password) as a client on another host would
    reach it: by this host's own address on its network, which Redis takes as remote."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # sends nothing: picks the route's address
        except OSError:
            pytest.skip("this host has no network address besides loopback")
        address = probe.getsockname()[0]
    server = RedisServer(tmp_path / "protected").start()
    try:
        async with aioredis.from_url(server.url) as admin:
            await admin.config_set("bind", f"127.0.0.1 {address}")
        yield server.url.replace("127.0.0.1", address)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "denial", ["a database it lacks", "a user without evalsha", "protected mode"]
)
async def test_a_redis_that_will_not_let_tandem_in_is_unavailable_not_a_fault(
    redis_server: RedisServer, denial: str, tmp_path: Path
) -> None:
    """A job had been a 500, /health/all an internal error, and shutdown a traceback."""
    async with contextlib.AsyncExitStack() as stack:
        url = redis_server.url.removesuffix("/0") + "/99"  # the server keeps 16
        if denial == "a user without evalsha":
            url = await stack.enter_async_context(_user_without(redis_server, "evalsha"))
        if denial == "protected mode":
            url = await stack.enter_async_context(_protected_mode(tmp_path))
        store = RedisJobStore(url, prefix="denied")
        await store.open()
        stack.push_async_callback(store.close)
        with pytest.raises(QueueUnavailable, match="Redis is unavailable") as caught:
            await store.enqueue(JobSpec(id=new_job_id(), image=b"image"))
        assert caught.value.cause
        assert len(caught.value.cause) < 200  # protected mode's runs on for a kilobyte
        if denial != "a user without evalsha":  # every call: /health/all's too
            with pytest.raises(QueueUnavailable):
                await store.queue_depth()


@pytest.fixture
async def cluster_node(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis Cluster of one node, holding every slot: a managed Redis in cluster mode."""
    config = tmp_path / "cluster" / "nodes.conf"
    options = ("--cluster-enabled", "yes", "--cluster-config-file", str(config))
    server = RedisServer(tmp_path / "cluster", options=options, port=free_cluster_port()).start()
    async with aioredis.from_url(server.url) as admin:
        await admin.execute_command("CLUSTER", "ADDSLOTS", *range(16384))  # any Redis 6 too
        for _ in range(100):
            if (await admin.execute_command("CLUSTER", "INFO")).startswith(b"cluster_state:ok"):
                break
            await asyncio.sleep(0.1)
    yield server
    server.stop()


async def test_a_redis_cluster_is_said_unspoken_at_open_and_refuses_jobs_as_unavailable(
    cluster_node: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Tandem's scripts touch keys a cluster puts in different slots: each job had been a
    CROSSSLOT error logged with a traceback, and /health/all had said the queue was ok."""
    store = RedisJobStore(cluster_node.url, prefix="clustered")
    await store.open()
    try:
        warned = [r.getMessage() for r in caplog.records if r.name == "tandem.jobs"]
        assert any("is a Redis Cluster node" in message for message in warned)
        with pytest.raises(QueueUnavailable, match="Redis Cluster is not spoken") as caught:
            await store.enqueue(JobSpec(id=new_job_id(), image=b"image"))
        assert "Redis is unavailable" in str(caught.value)
        with pytest.raises(QueueUnavailable, match="Redis Cluster is not spoken"):
            await store.ping()
    finally:
        await store.close()


@pytest.mark.parametrize("how", ["an ACL", "rename-command"])
async def test_a_redis_that_denies_info_is_said_unchecked_and_still_serves(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, tmp_path: Path, how: str
) -> None:
    """As some managed Redis do, by ACL or by renaming it away: the checks at open had
    passed over it without a word."""
    async with contextlib.AsyncExitStack() as stack:
        if how == "an ACL":
            url = await stack.enter_async_context(_user_without(redis_server, "info"))
        else:
            renamed = RedisServer(tmp_path / "renamed", options=("--rename-command", "INFO", ""))
            url = renamed.start().url
            stack.callback(renamed.stop)
        store = RedisJobStore(url, prefix=f"no-info-{new_job_id()[:8]}")
        await store.open()
        stack.push_async_callback(store.close)
        await store.enqueue(JobSpec(id=new_job_id(), image=b"image"))
        assert await store.queue_depth() == 1
        assert await store.space() is None  # the metrics leave its gauges out
    warned = [r.getMessage() for r in caplog.records if r.name == "tandem.jobs"]
    assert len(warned) == 1
    assert "does not let Tandem read INFO" in warned[0]
    assert "was not checked" in warned[0]


async def test_a_user_denied_client_unblock_still_claims_and_stops_after_the_block(
    redis_server: RedisServer,
) -> None:
    """A worker told to stop ends its claim's blocking read with CLIENT ID and CLIENT UNBLOCK;
    an ACL without them must not stop the worker, only let the read run its time."""
    async with _user_without(redis_server, "client|id", "client|unblock") as url:
        store = RedisJobStore(url, prefix=f"no-unblock-{new_job_id()[:8]}")
        await store.open()
        try:
            assert await claim_told_to_stop(store, 0.2, within_s=LONGEST_BLOCK_S + 2) == []
            job = await store.enqueue(JobSpec(id=new_job_id(), image=b"image"))
            assert [c.id for c in await store.claim("w", 1, 30.0)] == [job.id]
        finally:
            await store.close()


async def test_a_message_on_the_changes_channel_that_is_no_job_id_is_not_fatal(
    store: RedisJobStore,
) -> None:
    """Bytes that are not UTF-8, published on the channel by some other client of the server,
    ended the process's one subscription: no watcher heard of a change again."""
    job = await store.enqueue(JobSpec(id=new_job_id(), image=b"\xff\xd8 image"))
    async with store.watch(job.id) as watch:
        await watch.wait(timeout=0.2)  # the subscription is up: it wakes every watcher
        await store._client.publish(store._changes, b"\xff\xfe not a job id")
        await asyncio.sleep(0.2)
        await store.claim("w", 1, 0)
        await store.complete(job.id, Prediction("m", (Scored(1, "one", 0.9),), 1.0))
        started = time.monotonic()
        await watch.wait(timeout=10)
        assert time.monotonic() - started < 3


ANSWER = Prediction("accurate", (Scored(1, "one", 0.9),), 1.0)


@pytest.fixture
async def full_redis(tmp_path: Path) -> AsyncIterator[tuple[RedisJobStore, list[str]]]:
    """A store on a Redis of its own, filled with small images to its memory limit (a MB over
    what it held), and the ids of the jobs it took before it refused the next one."""
    server = RedisServer(tmp_path / "redis").start()
    store = RedisJobStore(server.url, prefix="full")
    await store.open()
    used = (await store._client.info("memory"))["used_memory"]
    await store._client.config_set("maxmemory", used + 1024 * 1024)
    queued: list[str] = []
    with pytest.raises(QueueUnavailable, match="maxmemory"):
        await _enqueue_until_refused(store, queued)
    yield store, queued
    await store.close()
    server.stop()


async def _enqueue_until_refused(store: RedisJobStore, queued: list[str]) -> None:
    for _ in range(10_000):
        queued.append((await store.enqueue(JobSpec(id=new_job_id(), image=b"x" * 4000))).id)


async def test_workers_drain_a_queue_that_filled_redis_to_its_limit(
    full_redis: tuple[RedisJobStore, list[str]],
) -> None:
    """At its limit Redis refuses a script's first write that adds data: every lease was
    refused, and a queue of small images that had filled Redis never drained."""
    store, queued = full_redis
    assert len(queued) > 100
    claims = await store.claim("w", len(queued), 0)
    assert sorted(claim.id for claim in claims) == sorted(queued)
    completed = await store.complete_many({claim.id: ANSWER for claim in claims})
    assert completed.stored == set(queued)
    assert await store.queue_depth() == 0
    # Their images gone, there is room for new jobs again.
    await store.enqueue(JobSpec(id=new_job_id(), image=b"x" * 4000))


async def test_the_room_redis_reports_is_what_it_takes_before_it_refuses_jobs(
    full_redis: tuple[RedisJobStore, list[str]],
) -> None:
    """tandem_store_room_bytes: none left at the limit that refused the last job, and the
    images' room back once their jobs are done."""
    store, queued = full_redis
    full = await store.space()
    assert full is not None
    assert full.room_bytes < 16 * 1024  # the refused command's buffers may be freed since
    claims = await store.claim("w", len(queued), 0)
    await store.complete_many({claim.id: ANSWER for claim in claims})
    drained = await store.space()
    assert drained is not None
    assert drained.room_bytes > len(queued) * 4000 // 2  # the images, less the results kept
    assert drained.used_bytes < full.used_bytes


async def test_a_redis_that_reads_no_script_flags_runs_the_scripts_without_them(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis 6 cannot compile the flag line: there, as Redis 7 does with a line it cannot
    compile after it, the store runs its scripts without it, and says what that costs."""
    monkeypatch.setattr(scripts, "ALLOW_OOM", scripts.ALLOW_OOM + "no Lua can start so\n")
    store = RedisJobStore(redis_server.url, prefix=f"unflagged-{new_job_id()[:8]}")
    await store.open()
    try:
        job = await store.enqueue(JobSpec(id=new_job_id(), image=b"image"))
        [claim] = await store.claim("w", 1, 0)
        assert (await store.complete_many({claim.id: ANSWER})).stored == {job.id}
    finally:
        await store.close()
    assert "reads no script flags (before 7.0)" in caplog.text


async def test_a_worker_s_heartbeat_goes_in_at_redis_s_limit(
    full_redis: tuple[RedisJobStore, list[str]],
) -> None:
    """Refused there, it had left /health/all saying no worker served the model while the
    worker drained the queue: an alert to restart workers that were at work."""
    store, _ = full_redis
    await store.beat("draining", "accurate")
    assert await store.live_models(60) == {"accurate"}


async def test_counts_go_in_at_redis_s_limit(
    full_redis: tuple[RedisJobStore, list[str]],
) -> None:
    """Refused there, a webhook's delivery was recorded but never counted, and a worker's
    counts of agreement waited, re-sent every heartbeat, until the queue had drained."""
    store, _ = full_redis
    await store.add_counts({"webhooks_delivered": 1, "judged": 2})
    await store.add_counts({"judged": 1})
    assert await store.counts() == {"webhooks_delivered": 1, "judged": 3}
