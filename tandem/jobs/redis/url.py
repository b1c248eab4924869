"""A Redis URL checked as redis-py will read it, before anything connects."""

from __future__ import annotations

import inspect
from urllib.parse import unquote, urlsplit

from redis.asyncio.connection import Connection, ConnectionPool, parse_url


def check_url(url: str) -> None:
    """Raise ValueError for a URL that redis-py would refuse only at its first connection, and
    then with a TypeError: an option in its query that the connection does not take (a TLS
    option on redis://, a misspelt name); and for a database path that is no number. Messages
    name options and the path, never the password or an option's value."""
    _check_database(url)
    options = parse_url(url)
    connection = options.pop("connection_class", Connection)
    unknown = sorted(set(options) - _parameters(connection) - _parameters(ConnectionPool))
    if not unknown:
        return
    names = ", ".join(unknown)
    if urlsplit(url).scheme == "redis" and all(name.startswith("ssl_") for name in unknown):
        raise ValueError(f"the Redis URL's {names} needs TLS: start it with rediss://")
    raise ValueError(f"the Redis URL has options that redis-py does not know: {names}")


def _check_database(url: str) -> None:
    """redis-py takes a path that is no number (`/abc`, `/O`) for no path at all: database 0,
    which another deployment may use."""
    parts = urlsplit(url)
    database = unquote(parts.path).replace("/", "")  # as redis-py reads it
    if parts.scheme in ("redis", "rediss") and database and not _is_number(database):
        raise ValueError(f"the Redis URL's path names a database by number (/0), not {database!r}")


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


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
