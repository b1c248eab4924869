"""How the store reaches Redis: a pool of connections to the URL's server, or to the primary
that Redis Sentinel names for the service the URL's host names."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from redis import asyncio as aioredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError, RedisError

from tandem.tasks import stop

log = logging.getLogger("tandem.jobs")

# What a Sentinel publishes once it has failed a service over: "<service> <old host> <old
# port> <new host> <new port>".
SWITCH_CHANNEL = "+switch-master"
FOLLOW_RETRY_S = 1.0
# A reply Redis has not sent by then is QueueUnavailable. Without a bound, a Redis that hangs
# (stopped, or across a partition that drops packets) held every request that stored a job,
# past its deadline, until TCP gave up: many minutes.
REPLY_TIMEOUT_S = 5.0
# Connections to Redis per process, at most: a worker's blocking reads and a proxy's pub/sub
# subscription hold one each; the rest serve requests, one call at a time. A call beyond them
# waits for one: redis-py's default pool refused it, and a proxy's reads of jobs for a
# thousand woken watchers had been 503s.
MAX_CONNECTIONS = 64
# After a failover behind an address that moved to the new primary (a DNS name, a virtual
# IP), a pooled connection stays with the old one, now a replica, and every write through it
# is refused (READONLY) until a restart. Such a connection is closed and the command sent once
# more, on a new connection to wherever the address leads now. Nothing else is retried: a
# Redis that is down or hung is reported at once (QueueUnavailable).
AFTER_FAILOVER = Retry(NoBackoff(), retries=1, supported_errors=(ReadOnlyError,))


@dataclass(frozen=True, slots=True)
class Sentinels:
    """Redis Sentinels to ask for the current primary; the URL's host names the service they
    watch, and its password, database and TLS options are the primary's."""

    addresses: tuple[tuple[str, int], ...]
    password: str | None = field(default=None, repr=False)


class _SentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's choice of primary, with the blocking pool's wait for a free connection."""

    async def leave_primary(self) -> None:
        """Close every connection, the idle ones now and the busy ones as they come back, so
        that each is made again to the primary the Sentinels name now."""
        async with self._lock:
            for connection in self._in_use_connections:
                connection.mark_for_reconnect()  # type: ignore[no-untyped-call]  # closed on release
        await self.disconnect(inuse_connections=False)


class Link:
    """A client of Redis, and the Sentinels' connections that close with it."""

    def __init__(
        self,
        client: aioredis.Redis,
        sentinel: Sentinel | None = None,
        service: str = "",
        on_switch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self._sentinel = sentinel
        self._service = service
        self._on_switch = on_switch
        self._last_switch = ""  # each Sentinel announces the same failover
        # Started here, from the store's open, on its event loop.
        self._following = [
            asyncio.create_task(self._follow(asked), name="tandem-sentinel-switches")
            for asked in (sentinel.sentinels if sentinel else ())
        ]

    @classmethod
    def open(
        cls,
        url: str,
        client_name: str,
        sentinels: Sentinels | None = None,
        on_switch: Callable[[], Awaitable[None]] | None = None,
    ) -> Link:
        """A link to the URL's server, or to the primary `sentinels` name; `on_switch` is
        awaited once they have named another (its connections are then being made again)."""
        options: dict[str, Any] = {
            "max_connections": MAX_CONNECTIONS,
            "timeout": REPLY_TIMEOUT_S,  # for a free connection
            "socket_connect_timeout": 2.0,
            "socket_timeout": REPLY_TIMEOUT_S,  # a pub/sub subscription's reads still block
            "health_check_interval": 10,
            "client_name": client_name,
            "retry": AFTER_FAILOVER,
        }
        if sentinels is None:
            pool = aioredis.BlockingConnectionPool.from_url(url, **options)
            return cls(aioredis.Redis.from_pool(pool))
        return _through(sentinels, url, options, on_switch)

    async def close(self) -> None:
        for task in self._following:
            await stop(task)
        await self.client.aclose()
        for sentinel in self._sentinel.sentinels if self._sentinel else ():
            await sentinel.aclose()

    async def _follow(self, asked: aioredis.Redis) -> None:
        """Leave the old primary as soon as this Sentinel names a new one. Until a Sentinel
        demotes it, seconds later, the old primary still takes writes on the connections made
        to it, and drops them as it resyncs: each was refused, or lost (see the README's
        Durability note)."""
        while True:
            try:
                async with asked.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(SWITCH_CHANNEL)
                    async for message in pubsub.listen():
                        announcement = as_text(message["data"], errors="replace")
                        if announcement.split(" ", 1)[0] == self._service:
                            await self._switched(asked, announcement)
            except (RedisError, OSError):
                pass  # this Sentinel is away; the others still say
            except Exception:  # nobody awaits this task: a fault would end the following
                log.exception("following Redis Sentinel's failovers failed; subscribing again")
            await asyncio.sleep(FOLLOW_RETRY_S)

    async def _switched(self, asked: aioredis.Redis, announcement: str) -> None:
        assert self._sentinel is not None
        if announcement == self._last_switch:
            return
        self._last_switch = announcement
        log.warning("Redis Sentinel failed over: %s; reconnecting", announcement)
        # Asked first for the primary: the other Sentinels may not have heard yet.
        self._sentinel.sentinels.remove(asked)
        self._sentinel.sentinels.insert(0, asked)
        pool = self.client.connection_pool
        assert isinstance(pool, _SentinelPool)
        await pool.leave_primary()
        if self._on_switch is not None:
            await self._on_switch()


def _through(
    sentinels: Sentinels,
    url: str,
    options: dict[str, Any],
    on_switch: Callable[[], Awaitable[None]] | None,
) -> Link:
    """A link to the primary that the Sentinels name for the service the URL's host names;
    the URL's other parts are the primary's, and its TLS options the Sentinels' too."""
    primary = parse_url(url)
    service = str(primary.pop("host"))
    primary.pop("port", None)
    tls = primary.pop("connection_class", None) is SSLConnection
    reach = {key: value for key, value in primary.items() if key.startswith("ssl_")}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels.addresses,
        sentinel_kwargs={
            "password": sentinels.password,
            "socket_connect_timeout": options["socket_connect_timeout"],
            "socket_timeout": options["socket_timeout"],
            **({"ssl": True, **reach} if tls else {}),
        },
        **primary,
    )
    client = sentinel.master_for(
        service,
        redis_class=aioredis.Redis,
        connection_pool_class=_SentinelPool,
        ssl=tls,
        **options,
    )
    return Link(client, sentinel, service, on_switch)


def as_text(value: bytes | str, errors: str = "strict") -> str:
    """A reply as text: redis-py gives bytes, unless the client decodes them."""
    return value.decode(errors=errors) if isinstance(value, bytes) else value


def where(url: str, sentinels: Sentinels | None = None) -> str:
    """The server, or the service and its Sentinels, without the password a URL may carry."""
    parts = urlsplit(url)
    if sentinels is not None:
        asked = ",".join(_address(host, port) for host, port in sentinels.addresses)
        return f"service {parts.hostname} (Sentinels {asked})"
    if parts.scheme == "unix":
        return parts.path
    return _address(parts.hostname or "", parts.port or 6379)


def _address(host: str, port: int) -> str:
    """host:port, an IPv6 host in brackets as in a URL."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
