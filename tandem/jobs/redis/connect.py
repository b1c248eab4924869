"""How the store reaches Redis: a pool of connections to the URL's server, or to the primary
that Redis Sentinel names for the service the URL's host names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from redis import asyncio as aioredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError

SENTINEL_PORT = 26379
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


def sentinel_addresses(entries: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """`host` or `host:port` entries (an IPv6 host in brackets); ValueError names a bad one."""
    addresses = []
    for entry in entries:
        parts = urlsplit(f"//{entry}")
        try:
            port = parts.port or SENTINEL_PORT
        except ValueError:
            port = 0
        if not parts.hostname or not port or parts.path or parts.username is not None:
            raise ValueError(f"a Sentinel is host or host:port, not {entry!r}")
        addresses.append((parts.hostname, port))
    return tuple(addresses)


class _SentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's choice of primary, with the blocking pool's wait for a free connection."""


class Link:
    """A client of Redis, and the Sentinels' connections that close with it."""

    def __init__(self, client: aioredis.Redis, sentinel: Sentinel | None = None) -> None:
        self.client = client
        self._sentinel = sentinel

    @classmethod
    def open(cls, url: str, client_name: str, sentinels: Sentinels | None = None) -> Link:
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
        return _through(sentinels, url, options)

    async def close(self) -> None:
        await self.client.aclose()
        for sentinel in self._sentinel.sentinels if self._sentinel else ():
            await sentinel.aclose()


def _through(sentinels: Sentinels, url: str, options: dict[str, Any]) -> Link:
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
    return Link(client, sentinel)


def where(url: str, sentinels: Sentinels | None = None) -> str:
    """The server, or the service and its Sentinels, without the password a URL may carry."""
    parts = urlsplit(url)
    if sentinels is not None:
        asked = ",".join(f"{host}:{port}" for host, port in sentinels.addresses)
        return f"service {parts.hostname} (Sentinels {asked})"
    return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
