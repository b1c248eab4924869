"""Request ids: taken from `X-Request-ID` when sane, made up otherwise, echoed on every response."""

from __future__ import annotations

import re
import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem import tracing
from tandem.api.paths import route_path
from tandem.logs import current_request_id

HEADER = "x-request-id"
NOSNIFF = (b"x-content-type-options", b"nosniff")
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a (lower-case) request header in an ASGI scope."""
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def request_id_of(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


class RequestIdMiddleware:
    """Gives each request an id: the log context and the `X-Request-ID` header; and every
    response `X-Content-Type-Options: nosniff`. Pure ASGI, so streaming responses pass
    through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = header(scope, HEADER.encode())
        sane = incoming if incoming is not None and _SANE.fullmatch(incoming) else None
        request_id = sane or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_request_id.set(request_id)
        tracing.tag_request(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((HEADER.encode(), request_id.encode()))
                headers.append(NOSNIFF)  # a browser takes each body as its type says
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


# GET routes that make something: GET /predict/test queues a job, as the original's did. HEAD
# is safe (RFC 9110): there it is a 405, not a GET whose answer is dropped.
GET_WITH_EFFECTS = frozenset({"/predict/test"})


class HeadAsGet:
    """HEAD served as GET. Every general-purpose server must support HEAD (RFC 9110), and
    FastAPI's routes take GET alone: HEAD /health, as uptime checks send it, was a 405. The
    app answers a GET; uvicorn, which still holds the request as HEAD, sends the response's
    head and drops its body. Not on GET_WITH_EFFECTS: HEAD /predict/test had queued a job."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "HEAD"
            and route_path(scope) not in GET_WITH_EFFECTS
        ):
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
