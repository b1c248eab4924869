"""A Redis URL checked as redis-py will read it, before anything connects."""

from __future__ import annotations

import inspect
from urllib.parse import urlsplit

from redis.asyncio.connection import Connection, ConnectionPool, parse_url


def check_url(url: str) -> None:
    """Raise ValueError for a URL that redis-py would refuse only at its first connection, and
    then with a TypeError: an option in its query that the connection does not take (a TLS
    option on redis://, a misspelt name). Messages name options, never values, which may be
    secrets."""
    options = parse_url(url)
    connection = options.pop("connection_class", Connection)
    unknown = sorted(set(options) - _parameters(connection) - _parameters(ConnectionPool))
    if not unknown:
        return
    names = ", ".join(unknown)
    if urlsplit(url).scheme == "redis" and all(name.startswith("ssl_") for name in unknown):
        raise ValueError(f"the Redis URL's {names} needs TLS: start it with rediss://")
    raise ValueError(f"the Redis URL has options that redis-py does not know: {names}")


def _parameters(cls: type) -> set[str]:
    """The keyword arguments `cls(...)` takes: its own, and those its __init__ passes on to a
    base class's through **kwargs."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        names |= named - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names
