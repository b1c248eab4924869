"""Guards that answer before a request reaches a route: size, identity, load and time.

Each is pure ASGI, answers with the one error shape, and lets streaming responses through.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Collection

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.api.errors import error_json
from tandem.api.middleware import header
from tandem.api.page import DOCS_STATIC, ICON_PATH
from tandem.api.paths import route_path
from tandem.errors import (
    Overloaded,
    PayloadTooLarge,
    ReceiveTimeout,
    TandemError,
    Timeout,
    TooManyRequests,
    Unauthorized,
)
from tandem.keys import ApiKey, digest_of
from tandem.shares import Holdings

# Where ApiKeys leaves which client sent a request: its key's name or digest, never the key.
API_KEY_ID = "api_key_id"
# Load balancers and people checking on the service need these without a key.
# The web page and its icon are static and hold no data; what the page fetches is guarded
# like any other call.
OPEN_PATHS = frozenset({"/", ICON_PATH, "/health", "/health/all"})
# The API's description, which holds no data either: with it guarded, Swagger UI could not load
# it, and /docs was of no use on a server with keys. Its "Authorize" takes a key for the calls.
DOCS_PATHS = frozenset({"/docs", "/openapi.json"})
DOCS_PREFIX = DOCS_STATIC + "/"
KEY_REQUIRED = "a valid API key is required (Authorization: Bearer, or X-API-Key)"


async def _refuse(scope: Scope, receive: Receive, send: Send, error: TandemError) -> None:
    request_id = scope.get("state", {}).get("request_id")
    await error_json(error, request_id)(scope, receive, send)


class BodyLimit:
    """413 for bodies over `max_bytes`: at once from Content-Length, else while reading; 408
    for one not all there in time (`allowance_s`); 503 for one that would take the bodies held
    at once, all requests together, past `held_max_bytes`; with API keys and a `per_key_bytes`
    share, 429 for one that would take its key's bodies past that share, so that one client's
    uploads cannot take every other client's place.

    The body is read here, in full, before the app sees it: an error raised while a framework
    parses a body would become its own 400. Each body is bounded, and so is their sum: 40
    uploads of 16 MB held at once took a proxy from 0.21 to 0.86 GB, and nothing stopped a few
    hundred from taking the machine's memory. A declared length is held from the start, so a
    body that will not fit is refused before it is sent; one sent in chunks, as it grows.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float,
        min_rate_bytes_s: float,
        held_max_bytes: int,
        retry_after_s: int,
        per_key_bytes: int = 0,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s  # a stalled body had held its buffer for good
        self.min_rate_bytes_s = min_rate_bytes_s
        self.held_max_bytes = held_max_bytes
        self.retry_after_s = retry_after_s
        self.held = 0  # bytes the requests being read or served hold, all together
        self.held_by_key = Holdings(per_key_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        hold = _Hold(self, api_key_id_in(scope) if self.held_by_key.share else None)
        try:
            try:
                first = await self._received(scope, receive, hold)
            except (PayloadTooLarge, ReceiveTimeout, Overloaded, TooManyRequests) as error:
                await _refuse(scope, receive, send, error)
                return
            await self.app(scope, _replaying(first, receive), send)
        finally:
            hold.release()

    async def _received(self, scope: Scope, receive: Receive, hold: _Hold) -> Message:
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit():
            self._hold(hold, int(declared))
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout_at(started + self.timeout_s) as deadline:

                def extend(received: int) -> None:
                    deadline.reschedule(started + self.allowance_s(received))

                return await self._read_body(receive, hold, extend)
        except TimeoutError:
            raise ReceiveTimeout("body", (deadline.when() or started) - started) from None

    def allowance_s(self, received: int) -> float:
        """The time a body may take once `received` bytes of it are in. A fixed time for the
        whole body had cut off a large photo on a slow link while a client sending a byte a
        second held its place as long; each byte received earns time, at the minimum rate."""
        if self.min_rate_bytes_s == 0:
            return self.timeout_s
        return self.timeout_s + received / self.min_rate_bytes_s

    async def _read_body(
        self, receive: Receive, hold: _Hold, extend: Callable[[int], None]
    ) -> Message:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message  # the client went away; let the app see it
            chunk = message.get("body", b"")
            size += len(chunk)
            self._hold(hold, size)
            extend(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    def _hold(self, hold: _Hold, size: int) -> None:
        """Hold `size` bytes for this request, or raise what refuses it."""
        if size > self.max_bytes:
            raise PayloadTooLarge(
                f"the request body is larger than {self.max_bytes} bytes", max_bytes=self.max_bytes
            )
        more = size - hold.bytes
        if more <= 0:
            return
        share = self.held_by_key.share
        if hold.key is not None and not self.held_by_key.allows(hold.key, more):
            raise TooManyRequests(
                f"this API key's client would hold more than {share} bytes of"
                " request bodies at once, its share; try again once one is answered",
                retry_after=self.retry_after_s,
                limit_bytes=share,
            )
        if self.held + more > self.held_max_bytes:
            raise Overloaded(
                "the server holds as many request bodies as it may; try again shortly",
                retry_after=self.retry_after_s,
            )
        hold.take(more)


class _Hold:
    """What one request holds of its BodyLimit's bytes, given back when it ends."""

    def __init__(self, limit: BodyLimit, key: str | None) -> None:
        self._limit = limit
        self.key = key  # the client whose share it counts against, if shares are on
        self.bytes = 0

    def release(self) -> None:
        self.take(-self.bytes)

    def take(self, n: int) -> None:
        self.bytes += n
        self._limit.held += n
        if self.key is not None:
            self._limit.held_by_key.add(self.key, n)


def _replaying(first: Message, receive: Receive) -> Receive:
    """`first`, the whole body, to the app's first read; later reads only wait for a
    disconnect."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return first

    return replay


class ApiKeys:
    """With keys configured, every route but OPEN_PATHS needs one: `Authorization: Bearer K`
    or `X-API-Key: K`. Keys are compared as SHA-256 digests, each of them every time."""

    def __init__(self, app: ASGIApp, keys: Collection[ApiKey]) -> None:
        self.app = app
        self._keys = list(keys)

    def _identity(self, scope: Scope) -> str | None:
        """Whom the request's key names (see tandem.keys), if it carries a valid one."""
        offered = header(scope, b"x-api-key")
        authorization = header(scope, b"authorization") or ""
        scheme, _, token = authorization.partition(" ")
        if offered is None and scheme.lower() == "bearer":
            offered = token.strip()
        if not offered:
            return None
        digest = digest_of(offered)
        # Check every key, so the time taken says nothing about which one nearly matched.
        matches = [hmac.compare_digest(digest, key.digest) for key in self._keys]
        return self._keys[matches.index(True)].identity if any(matches) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        identity = self._identity(scope)
        if identity is not None:
            # Who sent it, for what belongs to a client (its idempotency keys, its shares,
            # its access log lines, the causes /health/all shows); never the key. Open
            # paths take it too, and go on without one.
            scope.setdefault("state", {})[API_KEY_ID] = identity
        elif not _open(route_path(scope)):
            await _refuse(scope, receive, send, Unauthorized(KEY_REQUIRED))
            return
        await self.app(scope, receive, send)


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path in DOCS_PATHS or path.startswith(DOCS_PREFIX)


def api_key_id_of(request: Request) -> str | None:
    """The client's identity when API keys are on: its key's name, or a digest of the key."""
    return api_key_id_in(request.scope)


def shows_causes(request: Request) -> bool:
    """Whether this caller may read what failed underneath an error (TandemError.cause): with
    API keys on, only one that sent a key; with them off, anyone may call anything."""
    keys_on = bool(request.app.state.settings.api_keys)
    return not keys_on or api_key_id_of(request) is not None


def api_key_id_in(scope: Scope) -> str | None:
    """The same, from the scope, for what runs before or around the app's routes."""
    value = scope.get("state", {}).get(API_KEY_ID)
    return value if isinstance(value, str) else None


class LoadShedder:
    """At most `limit` inference requests at once; beyond, 503 at once with Retry-After, so
    latency stays bounded under a flood and the service recovers as soon as it ends. With API
    keys and a `per_key` share, one key's requests beyond it get 429: a client that floods
    holds no more than its share of the places, and the other clients are still served."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        retry_after_s: int,
        paths: Collection[str],
        per_key: int = 0,
    ) -> None:
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.paths = frozenset(paths)
        self.in_flight = 0
        self._by_key = Holdings(per_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) not in self.paths:
            await self.app(scope, receive, send)
            return
        key = api_key_id_in(scope) if self._by_key.share else None
        error = self._refusal(key)
        if error is not None:
            await _refuse(scope, receive, send, error)
            return
        self._taken(key, +1)
        try:
            await self.app(scope, receive, send)
        finally:
            self._taken(key, -1)

    def _refusal(self, key: str | None) -> TandemError | None:
        if key is not None and not self._by_key.allows(key):
            return TooManyRequests(
                f"this API key's client has {self._by_key.share} requests being served, its"
                " share; try again once one is answered",
                retry_after=self.retry_after_s,
                limit=self._by_key.share,
            )
        if self.in_flight >= self.limit:
            return Overloaded(
                f"{self.limit} requests are being served; try again shortly",
                retry_after=self.retry_after_s,
            )
        return None

    def _taken(self, key: str | None, n: int) -> None:
        self.in_flight += n
        if key is not None:
            self._by_key.add(key, n)


class Deadline:
    """504 for a request whose response has not begun within `seconds`. Once it has, the
    deadline is off: a stream (Server-Sent Events) runs as long as it needs."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        deadline = asyncio.timeout(self.seconds)

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if not started:
                started = True
                deadline.reschedule(None)
            await send(message)

        try:
            async with deadline:
                await self.app(scope, receive, tracking_send)
        except TimeoutError:
            if started or not deadline.expired():
                raise
            error = Timeout(f"the request was not answered within {self.seconds} s")
            await _refuse(scope, receive, send, error)
