"""The distributed job store: Redis Streams with one consumer group for every worker.

Layout, under a key prefix (default "tandem"):
- `{p}:job:{id}`   a hash per job: status, times, attempts, meta, result, error, the image while
                   unfinished, and `entry`, the id of its stream entry.
- `{p}:queue`      a stream with one entry per unfinished job; consumer group `workers`.
                   Finished jobs' entries are acknowledged and deleted, so XLEN is the depth.
- `{p}:counters`  a hash of counters shared by every process (jobs by outcome, agreement,
                   webhook deliveries).
- `{p}:owners`     a hash: each owner's (API key id's) count of unfinished jobs, for its share.
- `{p}:changes`   a pub/sub channel: the id of each job whose state changed, for watchers.
- `{p}:workers`    a sorted set of worker ids by last heartbeat; `{p}:models` maps them to models.
                   A worker gone for an hour is forgotten, and so is its consumer in the group
                   once it holds no entry.
- `{p}:ping`       written by health checks: a Redis may answer but refuse writes.

Reliable delivery is Redis's own: XREADGROUP hands an entry to one consumer, it stays pending
until acknowledged, and XAUTOCLAIM takes over entries idle longer than the visibility timeout
(their worker died). Each state change is one Lua script (`scripts`), so it is atomic, and
the terminal ones only act on unfinished jobs, so a job delivered twice is answered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import (
    AskError,
    ClusterCrossSlotError,
    ClusterDownError,
    ExecAbortError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from tandem.errors import QueueUnavailable, UnreadableJob
from tandem.jobs.notify import Hub, Watch
from tandem.jobs.records import (
    STORED_FIELDS,
    Claim,
    Delivery,
    Job,
    JobSpec,
    JobStatus,
    dump_delivery,
    dump_meta,
    dump_prediction,
    job_from_stored,
    load_prediction,
    meta_with_fast,
)
from tandem.jobs.redis import scripts
from tandem.jobs.redis.connect import REPLY_TIMEOUT_S, Link, Sentinels, as_text, where
from tandem.jobs.store import (
    MISSING_IMAGE,
    WORKER_FORGOTTEN_S,
    Completed,
    StorePolicy,
    StoreSpace,
    owner_share_full,
    queue_full,
    unreadable_failure,
)
from tandem.outage import Outage
from tandem.predictions import Prediction
from tandem.tasks import first_set, stop

log = logging.getLogger("tandem.jobs")

T = TypeVar("T")
ScriptArg = str | bytes | int | float
GROUP = "workers"
_LOST = "the worker running this job stopped {n} times before finishing it"
RECONNECT_S = 0.5
UNAVAILABLE = "Redis is unavailable"
# Errors of a Redis that is up but takes no writes for now: at its memory limit, a replica
# (after a failover, or cut off from its primary: MASTERDOWN), unable to persist, short of
# replicas, busy with a script. The queue is unavailable, as when Redis is down; none of them
# is a fault of the request or of Tandem. redis-py gives some codes a class of their own
# (MasterDownError is a ClusterDownError) and strips the code from their message; the others
# keep it.
_REFUSALS = (OutOfMemoryError, ReadOnlyError, ExecAbortError, TryAgainError, ClusterDownError)
_REFUSAL_CODES = ("MISCONF ", "NOREPLICAS ", "BUSY ")
# Errors of a Redis that will not let Tandem in as configured: a database number it does not
# have (`/99` where it keeps 16), an ACL user without a command Tandem runs, protected mode
# (no password, and Tandem on another host). As with a wrong password, which redis-py raises
# as a connection error, the queue is unavailable until the operator mends it: they had been
# 500s, and /health/all an internal error.
_DENIALS = (NoPermissionError,)
_DENIAL_TEXTS = ("DB index is out of range", "DENIED ")
# A Redis Cluster node's replies to a script whose keys lie in other slots, or on another
# node (MovedError is an AskError). They had been faults, each logged with a traceback.
_CLUSTER_REPLIES = (ClusterCrossSlotError, AskError)
_NOT_A_CLUSTER = (
    "Redis Cluster is not spoken: each of Tandem's scripts changes keys that a cluster places"
    " in different slots; give it one primary (with Sentinels for failover)"
)
# Redis's reply to a command renamed away (rename-command INFO ""), as redis-py gives it.
_UNKNOWN = "unknown command"
# A claim's blocking read ends well within that; an idle worker then simply asks again.
LONGEST_BLOCK_S = REPLY_TIMEOUT_S / 2
# How often a claim told to stop asks Redis again to end its read's block.
UNBLOCK_AGAIN_S = 0.05


@dataclass(frozen=True, slots=True)
class Replication:
    """How many replicas must have a new job before its id goes out (Redis's WAIT), and for
    how long to wait for them. Redis replicates asynchronously: a job acknowledged by the
    primary alone is lost if the primary fails before a replica has it and one is promoted."""

    replicas: int = 0
    wait_s: float = 1.0

    def short(self, acknowledged: int) -> QueueUnavailable | None:
        """The error for a write that this many replicas acknowledged, or None if enough."""
        if acknowledged >= self.replicas:
            return None
        return QueueUnavailable(
            f"{acknowledged} of the {self.replicas} Redis replicas that must confirm each"
            f" job did so within {self.wait_s:g} s"
        )


class RedisJobStore:
    """JobStore on a Redis server (5.0+; XAUTOCLAIM needs 6.2+)."""

    def __init__(
        self,
        url: str,
        policy: StorePolicy | None = None,
        prefix: str = "tandem",
        replication: Replication | None = None,
        sentinels: Sentinels | None = None,
    ) -> None:
        self.url = url
        self.policy = policy or StorePolicy()
        self.replication = replication or Replication()
        self.sentinels = sentinels
        self._prefix = prefix
        self._queue = f"{prefix}:queue"
        self._counters = f"{prefix}:counters"
        self._changes = f"{prefix}:changes"
        self._deliveries = f"{prefix}:deliveries"
        self._owners = f"{prefix}:owners"
        self._workers = f"{prefix}:workers"
        self._models = f"{prefix}:models"
        self._link: Link | None = None
        self._in_a_cluster = False  # seen at open or in a reply; a ping, one key, would pass
        self._hub = Hub()
        self._listener: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[Watch]:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="tandem-redis-changes")
        async with self._hub.watch(job_id) as watch:
            yield watch

    @property
    def watchers(self) -> int:
        return self._hub.watchers

    async def _listen(self) -> None:
        """Feed the hub from the changes channel: one subscription per process, whatever the
        number of watchers. Reconnects by itself; after a gap every watcher re-reads."""
        faults = Outage(log, "listening for job changes", level=logging.ERROR)
        while True:
            try:
                async with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._changes)
                    self._hub.notify_all()
                    async for message in pubsub.listen():
                        # Any client of the server may publish here: what is no id wakes no one.
                        self._hub.notify(as_text(message["data"], errors="replace"))
                        faults.ended()
            except (RedisError, OSError, QueueUnavailable):
                pass  # Redis away: those who use it say so
            except Exception as exc:  # nobody awaits this task: a fault would end every wake-up
                faults.failed(f"{exc!r}; subscribing again", exc_info=True)
            await asyncio.sleep(RECONNECT_S)

    async def _listen_anew(self) -> None:
        """After a failover the subscription may still be with the old primary, which hears
        no job's change until it is demoted: made again, with the new one."""
        if self._listener is not None:
            await stop(self._listener)
            self._listener = asyncio.create_task(self._listen(), name="tandem-redis-changes")

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    @property
    def _client(self) -> aioredis.Redis:
        if self._link is None:
            raise QueueUnavailable("the job store is closed")
        return self._link.client

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation`; a Redis that is down, hung or refusing writes is QueueUnavailable."""
        try:
            return await self._with_group(operation)
        except ResponseError as exc:
            if refuses_writes(exc):
                raise QueueUnavailable("Redis refused the write", cause=str(exc)) from exc
            if denies_tandem(exc):
                raise QueueUnavailable(UNAVAILABLE, cause=_first_sentence(str(exc))) from exc
            if isinstance(exc, _CLUSTER_REPLIES):
                self._in_a_cluster = True
                raise QueueUnavailable(UNAVAILABLE, cause=_NOT_A_CLUSTER) from exc
            raise
        except MasterNotFoundError as exc:
            # Its text goes on to repeat each Sentinel's client, settings and all.
            asked = str(exc).split(" : ", 1)[0]
            raise QueueUnavailable(UNAVAILABLE, cause=f"{asked} by its Sentinels") from exc
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(UNAVAILABLE, cause=str(exc)) from exc

    async def _with_group(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation`, once more after mending what it met: a Redis that restarted
        without the group (no persistence), or one before 7.0 (see scripts.ALLOW_OOM), or a
        pipeline's scripts loaded into a server that is no longer the one it reaches (a
        failover, a restart: a new pipeline loads them again)."""
        try:
            return await operation()
        except NoScriptError:
            pass
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                await self._ensure_group()
            elif self._allow_oom and "Error compiling script" in str(exc):
                log.warning(
                    "Redis at %s reads no script flags (before 7.0): at its memory limit it"
                    " will refuse the workers' writes too, and a full queue will not drain",
                    self._where,
                )
                self._register_scripts(allow_oom=False)
            else:
                raise
        return await operation()

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._link is not None:
            return
        self._link = Link.open(self.url, connection_name(), self.sentinels, self._listen_anew)
        self._register_scripts(allow_oom=True)
        # Redis may be down at start-up; every later call retries and reports it.
        with contextlib.suppress(RedisError, OSError):
            await self._ensure_group()
            await self._check_keeping_if_let()

    def _register_scripts(self, allow_oom: bool) -> None:
        register = self._client.register_script
        flag = scripts.ALLOW_OOM if allow_oom else ""
        self._allow_oom = allow_oom
        self._enqueue = register(scripts.ENQUEUE)
        self._extend = register(scripts.EXTEND)  # neither writes what the limit refuses
        self._forget_consumer = register(scripts.FORGET_CONSUMER)
        self._lease = register(flag + scripts.LEASE)
        self._finish = register(flag + scripts.FINISH)
        self._fail = register(flag + scripts.FAIL)
        self._cancel = register(flag + scripts.CANCEL)
        self._record_delivery = register(flag + scripts.RECORD_DELIVERY)
        self._attach = register(flag + scripts.ATTACH)
        self._beat = register(flag + scripts.BEAT)
        self._add_counts = register(flag + scripts.ADD_COUNTS)

    def _check_replicas(self, connected: int) -> None:
        wanted = self.replication.replicas
        if connected < wanted:
            log.warning(
                "Redis at %s has %d replica(s) connected, and each job must reach %d: until"
                " more connect, new jobs are refused (503, with the fast answer)",
                self._where,
                connected,
                wanted,
            )
        elif wanted < connected:
            log.warning(
                "Redis at %s has %d replica(s) connected, and each job must reach %d"
                " (TANDEM_REDIS_MIN_REPLICAS): %s",
                self._where,
                connected,
                wanted,
                _failover_losses(wanted, connected),
            )

    async def _check_keeping_if_let(self) -> None:
        """A managed Redis may deny INFO, by ACL or by renaming it away: then say that nothing
        was checked, not nothing found."""
        try:
            await self._check_keeping()
        except ResponseError as exc:
            if not _info_denied(exc):
                raise
            log.warning(
                "Redis at %s does not let Tandem read INFO (%s): whether it may lose accepted"
                " jobs (its memory limit and policy, its append-only file, its replicas) was"
                " not checked",
                self._where,
                exc,
            )

    async def _check_keeping(self) -> None:
        """Warn of a Redis that may lose accepted jobs on its own: one that evicts keys under
        memory pressure, or keeps no append-only file, or, with no memory limit, grows with a
        backlog until the system kills it (see the README's durability note)."""
        info: Any = await self._client.info()  # its default sections: memory, persistence...
        if info.get("cluster_enabled"):
            self._in_a_cluster = True
            log.warning(
                "Redis at %s is a Redis Cluster node: every job will be refused (503, with the"
                " fast answer). %s",
                self._where,
                _NOT_A_CLUSTER,
            )
        if not info.get("maxmemory", 1):
            log.warning(
                "Redis at %s has no memory limit (maxmemory 0): a backlog of images grows it"
                " until the system kills it; set maxmemory, and at it Redis refuses new jobs"
                " (503, with the fast answer) while the workers drain the queue",
                self._where,
            )
        policy = info.get("maxmemory_policy", "noeviction")
        if policy != "noeviction":
            log.warning(
                "Redis at %s evicts keys (maxmemory-policy %s): at its memory limit it may drop "
                "queued jobs; set maxmemory-policy noeviction, so that it refuses new ones",
                self._where,
                policy,
            )
        self._check_replicas(int(info.get("connected_slaves", 0)))
        if not info.get("aof_enabled", 1):
            log.warning(
                "Redis at %s keeps no append-only file: a restart loses the jobs accepted since "
                "its last snapshot; run it with appendonly yes and appendfsync always",
                self._where,
            )

    @property
    def _where(self) -> str:
        return where(self.url, self.sentinels)

    async def _ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self._queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        await stop(self._listener)
        self._listener = None
        if self._link is not None:
            await self._link.close()
            self._link = None

    async def ping(self) -> None:
        # A write: a Redis that answers PING may still refuse every job (see _REFUSALS), and
        # one whose replicas cannot confirm it refuses them too. A cluster node takes the
        # write, a single key, and refuses every job.
        if self._in_a_cluster:
            raise QueueUnavailable(UNAVAILABLE, cause=_NOT_A_CLUSTER)
        key = f"{self._prefix}:ping"
        _, acknowledged = await self._replicated(lambda client: client.set(key, "1", px=60_000))
        if (short := self.replication.short(acknowledged)) is not None:
            raise short

    async def _replicated(
        self, write: Callable[[aioredis.Redis], Awaitable[Any]]
    ) -> tuple[Any, int]:
        """`write`'s reply, and how many replicas have it (0 where none is asked for). `write`
        sends its commands to the client it is given: the store's own, or a pipeline that
        ends with WAIT, since WAIT counts the replicas that have the connection's writes."""
        if not self.replication.replicas:  # no pipeline: it would cost SCRIPT EXISTS first
            return await self._call(lambda: write(self._client)), 0
        timeout_ms = int(self.replication.wait_s * 1000)

        async def run() -> tuple[Any, int]:
            async with self._client.pipeline(transaction=False) as pipe:
                await write(pipe)
                pipe.wait(self.replication.replicas, timeout_ms)
                reply, acknowledged = await pipe.execute()
            return reply, int(acknowledged)

        return await self._call(run)

    # -- producer side -------------------------------------------------------------------------

    async def enqueue(self, spec: JobSpec) -> Job:
        now = time.time()
        idempotency = f"{self._prefix}:idempotency:{spec.idempotency_slot or ''}"
        keys = [self._job_key(spec.id), self._queue, idempotency, self._owners]
        args: list[ScriptArg] = [
            spec.id,
            repr(now),
            dump_meta(spec),
            spec.image,
            self.policy.max_queue_length,
            self._job_key(""),
            "1" if spec.idempotency_slot else "0",
            spec.owner or "",
            self.policy.max_queued_per_owner,
        ]
        stored, acknowledged = await self._replicated(
            lambda client: self._enqueue(keys=keys, args=args, client=client)
        )
        if stored == b"owner":
            raise owner_share_full(self.policy.max_queued_per_owner)
        if stored == b"queue":
            raise queue_full(self.policy.max_queue_length)
        job_id, created = stored
        if created and (short := self.replication.short(acknowledged)) is not None:
            # Stored on the primary, so it runs, unless a failover loses it; its id does not
            # go out. A retry with the same Idempotency-Key gets it.
            raise short
        if created:  # built, not read back: a round trip less on the sync path
            return spec.queued(now)
        job = await self.get(as_text(job_id))
        if job is None:  # only if its TTL ran out between the two calls
            raise QueueUnavailable("the job expired while it was being stored")
        return job

    async def attach_fast(self, job_id: str, fast: Prediction) -> Prediction | None:
        key = self._job_key(job_id)
        meta: Any = await self._call(lambda: self._client.hget(key, "meta"))
        added = meta_with_fast(job_id, as_text(meta), fast) if meta is not None else None
        if added is None:
            return None
        args = [meta, added]
        result = await self._call(lambda: self._attach(keys=[key], args=args))
        return load_prediction(as_text(result)) if result else None

    async def get(self, job_id: str) -> Job | None:
        values = await self._call(lambda: self._client.hmget(self._job_key(job_id), STORED_FIELDS))
        if values[0] is None:
            return None
        return _job_from_fields(job_id, dict(zip(STORED_FIELDS, values, strict=True)))

    # -- worker side ---------------------------------------------------------------------------

    async def claim(
        self, worker_id: str, limit: int, wait_s: float, until: asyncio.Event | None = None
    ) -> list[Claim]:
        entries = await self._call(lambda: self._take_over(worker_id, limit))
        if len(entries) < limit:
            block_s = min(wait_s, LONGEST_BLOCK_S)
            blocks = wait_s > 0 and not entries and not (until is not None and until.is_set())
            block_ms = max(1, int(block_s * 1000)) if blocks else None
            entries += await self._call(
                lambda: self._read_new(worker_id, limit - len(entries), block_ms, until)
            )
        claims = []
        for entry_id, job_id in entries:
            claim = await self._lease_entry(entry_id, job_id, worker_id)
            if claim is not None:
                claims.append(claim)
        return claims

    async def extend(self, worker_id: str, job_ids: Sequence[str]) -> frozenset[str]:
        if not job_ids:
            return frozenset()
        keys = [self._queue, *(self._job_key(job_id) for job_id in job_ids)]
        renewed: list[Any] = await self._call(
            lambda: self._extend(keys=keys, args=[GROUP, worker_id])
        )
        return frozenset(job_ids[int(position) - 1] for position in renewed)

    async def _take_over(self, worker_id: str, limit: int) -> list[tuple[str, str]]:
        idle_ms = int(self.policy.visibility_timeout_s * 1000)
        reply = await self._client.xautoclaim(
            self._queue, GROUP, worker_id, idle_ms, start_id="0-0", count=limit
        )
        return _entries(reply[1])

    async def _read_new(
        self, worker_id: str, count: int, block_ms: int | None, until: asyncio.Event | None
    ) -> list[tuple[str, str]]:
        def read(client: aioredis.Redis) -> Awaitable[Any]:
            return client.xreadgroup(
                GROUP, worker_id, {self._queue: ">"}, count=count, block=block_ms
            )

        if block_ms is None or until is None:
            reply = await read(self._client)
        else:
            reply = await self._read_until(read, until)
        return _entries(reply[0][1]) if reply else []

    async def _read_until(
        self, read: Callable[[aioredis.Redis], Awaitable[Any]], until: asyncio.Event
    ) -> Any:
        """A blocking `read` on a connection of its own, which `until` unblocks (CLIENT
        UNBLOCK): Redis then ends the block as a timeout, so nothing is delivered to a reader
        that is leaving. Cancelling the read instead could lose a reply with entries in it,
        pending on a worker that never saw them until their lease ran out."""
        reader = self._client.client()
        try:
            try:
                reader_id = await reader.client_id()
            except ResponseError:  # CLIENT ID denied by an ACL: the block runs its time
                return await read(reader)
            reading = asyncio.ensure_future(read(reader))
            try:
                await first_set(until, done=reading)
                await self._unblock(reading, reader_id)
                return await reading
            finally:
                reading.cancel()  # only reached undone if this claim itself is cancelled
        finally:
            await reader.aclose()

    async def _unblock(self, reading: asyncio.Future[Any], reader_id: int) -> None:
        # The read may not have reached Redis yet (nothing to unblock): ask again shortly.
        with contextlib.suppress(ResponseError):  # CLIENT UNBLOCK denied: as above
            while not reading.done():
                await self._client.client_unblock(reader_id)
                await asyncio.wait({reading}, timeout=UNBLOCK_AGAIN_S)

    async def _lease_entry(self, entry_id: str, job_id: str, worker_id: str) -> Claim | None:
        now = time.time()
        keys = self._finishing_keys(job_id)
        args: list[ScriptArg] = [
            entry_id,
            repr(now),
            self.policy.max_attempts,
            self._ttl_ms,
            _LOST_LUA,
            GROUP,
            MISSING_IMAGE,
            *self._announcing(job_id),
        ]
        image = await self._call(lambda: self._lease(keys=keys, args=args))
        if image is None:
            return None
        try:
            job = await self.get(job_id)
        except UnreadableJob as exc:
            await self._finish_unreadable(job_id, exc)
            return None
        return Claim(job, bytes(image), worker_id) if job is not None else None

    async def _finish_unreadable(self, job_id: str, exc: UnreadableJob) -> None:
        keys, args = self._finish_call(job_id, JobStatus.FAILED, error=unreadable_failure(exc))
        await self._call(lambda: self._finish(keys=keys, args=args))

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.policy.result_ttl_s * 1000))

    async def complete(self, job_id: str, result: Prediction) -> bool:
        return job_id in (await self.complete_many({job_id: result})).stored

    async def complete_many(
        self,
        results: Mapping[str, Prediction],
        tallies: Mapping[str, Sequence[str]] | None = None,
    ) -> Completed:
        tallies = tallies or {}

        async def finish_all() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for job_id, result in results.items():
                    keys, args = self._finish_call(
                        job_id, JobStatus.DONE, dump_prediction(result), tally=tallies.get(job_id)
                    )
                    await self._finish(keys=keys, args=args, client=pipe)
                replies: list[Any] = await pipe.execute()
            return replies

        replies = dict(zip(results, await self._call(finish_all), strict=True))
        return Completed(
            stored=frozenset(job_id for job_id, reply in replies.items() if reply),
            untallied=frozenset(job_id for job_id, reply in replies.items() if reply == 2),
        )

    def _announcing(self, job_id: str) -> list[ScriptArg]:
        """The last arguments of a script that changes a job (see scripts.ANNOUNCE)."""
        return [self._changes, job_id]

    def _finishing_keys(self, job_id: str) -> list[str]:
        """The keys of every script that may finish a job (see scripts.FINISH_BODY)."""
        return [
            self._job_key(job_id),
            self._queue,
            self._counters,
            self._deliveries,
            self._owners,
        ]

    def _finish_call(
        self,
        job_id: str,
        status: JobStatus,
        result: str = "",
        error: str = "",
        tally: Sequence[str] | None = None,
    ) -> tuple[list[str], list[ScriptArg]]:
        """Keys and arguments of the finishing script for one job."""
        keys = self._finishing_keys(job_id)
        now = repr(time.time())
        tallied = ",".join(tally or ())
        args = [status.value, now, self._ttl_ms, result, error, GROUP, tallied]
        return keys, [*args, *self._announcing(job_id)]

    async def fail(self, job_id: str, error: str, *, retry: bool) -> Job | None:
        keys = self._finishing_keys(job_id)
        args: list[ScriptArg] = [
            repr(time.time()),
            error,
            GROUP,
            job_id,
            int(retry),
            self.policy.max_attempts,
            self._ttl_ms,
            *self._announcing(job_id),
        ]
        await self._call(lambda: self._fail(keys=keys, args=args))
        return await self.get(job_id)

    async def cancel(self, job_id: str) -> Job | None:
        keys = self._finishing_keys(job_id)
        args: list[ScriptArg] = [repr(time.time()), self._ttl_ms, GROUP, *self._announcing(job_id)]
        await self._call(lambda: self._cancel(keys=keys, args=args))
        return await self.get(job_id)

    async def record_delivery(self, job_id: str, delivery: Delivery) -> None:
        keys = [self._job_key(job_id), self._deliveries]
        args: list[ScriptArg] = [dump_delivery(delivery), int(delivery.state.final)]
        await self._call(lambda: self._record_delivery(keys=keys, args=args))

    async def undelivered(self, before: float, limit: int) -> list[Job]:
        members: list[Any] = await self._call(
            lambda: self._client.zrangebyscore(
                self._deliveries, "-inf", f"({before!r}", start=0, num=limit
            )
        )
        waiting, gone = [], []
        for key in map(as_text, members):
            try:
                job = await self.get(key.removeprefix(self._job_key("")))
            except UnreadableJob:
                continue  # left for a worker that can read it
            if job is None or (job.webhook is not None and job.webhook.state.final):
                gone.append(key)  # expired, or delivered by a worker that then lost its reply
            elif job.webhook is None or (job.webhook.updated_at or 0.0) < before:
                waiting.append(job)
        if gone:
            await self._call(lambda: self._client.zrem(self._deliveries, *gone))
        return waiting

    # -- housekeeping --------------------------------------------------------------------------

    async def queue_depth(self) -> int:
        return int(await self._call(lambda: self._client.xlen(self._queue)))

    async def oldest_unfinished_at(self) -> float | None:
        # Entries are deleted when their job finishes, so the first is the oldest unfinished;
        # its id starts with the millisecond it was added.
        first: Any = await self._call(lambda: self._client.xrange(self._queue, count=1))
        if not first:
            return None
        return int(as_text(first[0][0]).split("-")[0]) / 1000.0

    async def space(self) -> StoreSpace | None:
        """The server's memory (every key in it, not Tandem's alone); room: up to its
        `maxmemory`, as Redis counts toward it. None where it denies Tandem INFO."""

        async def read() -> StoreSpace | None:
            try:
                memory: Any = await self._client.info("memory")
            except ResponseError as exc:
                if _info_denied(exc):
                    return None
                raise
            return _space(memory)

        return await self._call(read)

    async def purge_expired(self) -> int:
        await self._call(self._forget_gone_workers)
        return 0  # Redis expires finished jobs by itself (PEXPIRE in the finishing script).

    async def _forget_gone_workers(self) -> None:
        before = time.time() - WORKER_FORGOTTEN_S
        seen: list[Any] = await self._client.zrange(self._workers, 0, -1, withscores=True)
        gone = [worker for worker, at in seen if at < before]
        live = {as_text(worker) for worker, at in seen if at >= before}
        if gone:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._workers, *gone)
                pipe.hdel(self._models, *gone)
                await pipe.execute()
        consumers: list[dict[str, Any]] = await self._client.xinfo_consumers(self._queue, GROUP)
        for consumer in consumers:
            name = as_text(consumer["name"])
            if name not in live and consumer["pending"] == 0:
                await self._forget_consumer(keys=[self._queue], args=[GROUP, name])

    async def add_counts(self, counts: Mapping[str, int]) -> None:
        args: list[ScriptArg] = [part for pair in counts.items() for part in pair]
        if args:
            await self._call(lambda: self._add_counts(keys=[self._counters], args=args))

    async def counts(self) -> dict[str, int]:
        raw: Any = await self._call(lambda: self._client.hgetall(self._counters))
        return {as_text(name): int(value) for name, value in raw.items()}

    async def beat(self, worker_id: str, model: str) -> None:
        keys = [self._workers, self._models]
        await self._call(lambda: self._beat(keys=keys, args=[worker_id, time.time(), model]))

    async def live_models(self, within_s: float) -> set[str]:
        since = time.time() - within_s
        ids: Any = await self._call(
            lambda: self._client.zrangebyscore(self._workers, since, "+inf")
        )
        if not ids:
            return set()
        models = await self._call(lambda: self._client.hmget(self._models, ids))
        return {as_text(m) for m in models if m is not None}


def _info_denied(exc: ResponseError) -> bool:
    """INFO denied by ACL, or renamed away, as some managed Redis do."""
    return isinstance(exc, NoPermissionError) or str(exc).startswith(_UNKNOWN)


def _space(memory: Mapping[str, Any]) -> StoreSpace:
    used = int(memory["used_memory"])
    limit = int(memory.get("maxmemory", 0))
    if not limit:  # it grows until the system kills it (README, Durability)
        return StoreSpace(used, math.inf)
    # Replication and AOF buffers do not count toward the limit.
    counted = used - int(memory.get("mem_not_counted_for_evict", 0))
    return StoreSpace(used, max(0, limit - counted))


# Lua's string.format placeholder for the attempt count.
_LOST_LUA = _LOST.replace("{n}", "%d")


def _entries(raw: Any) -> list[tuple[str, str]]:
    """[(entry id, job id)] from XREADGROUP/XAUTOCLAIM replies; deleted entries come as None.
    An entry that names no job (another client's) gets the empty id: no job has it, so its
    lease drops the entry as stale."""
    entries = []
    for entry_id, fields in raw:
        if fields:
            entries.append((as_text(entry_id), as_text(fields.get(b"id", b""))))
    return entries


def connection_name(pid: int | None = None) -> str:
    """What this process's connections are called, so that `CLIENT LIST` tells who holds them."""
    host = re.sub(r"[^\w.-]", "_", socket.gethostname())
    return f"tandem-{host}-{pid if pid is not None else os.getpid()}"


def refuses_writes(exc: ResponseError) -> bool:
    """Whether Redis refused for a state of its own that passes (see _REFUSALS)."""
    return isinstance(exc, _REFUSALS) or str(exc).startswith(_REFUSAL_CODES)


def denies_tandem(exc: ResponseError) -> bool:
    """Whether Redis, as configured, will not serve Tandem at all (see _DENIALS)."""
    return isinstance(exc, _DENIALS) or str(exc).startswith(_DENIAL_TEXTS)


def _first_sentence(text: str) -> str:
    """Protected mode's DENIED runs on for a kilobyte of remedies, into every log line."""
    return text.split(". ", 1)[0]


def _failover_losses(wanted: int, connected: int) -> str:
    """What a failover can lose with fewer replicas asked for than are connected (see the
    README's Durability note)."""
    if wanted == 0:
        return "a failover loses the jobs the promoted replica had not received; set it to 1"
    return (
        "a failover with the old primary still up can lose jobs it accepted; set it to"
        f" {connected}, every replica, for none lost, at the cost of refusing new jobs while"
        " one is away"
    )


def _job_from_fields(job_id: str, fields: dict[str, Any]) -> Job:
    return job_from_stored(job_id, {k: as_text(v) for k, v in fields.items() if v is not None})
