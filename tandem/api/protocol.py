"""uvicorn's HTTP protocol, with what it answers itself in Tandem's error shape, and a bound
on the size of a request's head.

A request uvicorn cannot parse (broken framing, a bad header line, a body longer than its
Content-Length) never reaches the app: uvicorn answered it in plain text and closed the
connection. This answers it as the app answers every other error, then closes as before.

httptools buffers a header until its end, however long: one connection sending a 200 MB
header took a proxy from 0.27 to 0.67 GB. A head past MAX_HEAD_BYTES gets 431 and the
connection closed. Nor did uvicorn bound the time a head takes, or a new connection's wait
for its first byte: a client that stalled held its connection for good. A head still
arriving after the receive timeout gets 408; a connection with nothing sent by then is
closed. (httptools comes with uvicorn[standard]; uvicorn's other protocol, h11, is slower,
and Tandem does not use it.)

Requests read whole before the bytes refused are answered first, in their order (RFC 9112,
9.3.2), and the refusal after them: uvicorn had written its 400 at once and closed, so that a
request pipelined ahead of the bad bytes (or sent with a Content-Length short of its body)
was served, its job queued, and its response lost.

Tandem speaks no WebSocket (`tandem serve` runs uvicorn with `ws="none"`): a request to
upgrade is served as plain HTTP, where with a WebSocket library uvicorn had answered 403
with an empty body for want of a WebSocket route.
"""

from __future__ import annotations

import asyncio
import http
import logging
import uuid
from collections.abc import Callable

from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from tandem.api.errors import error_body
from tandem.api.middleware import HEADER, NOSNIFF
from tandem.errors import HeadTooLarge, InvalidRequest, ReceiveTimeout, TandemError

access_log = logging.getLogger("tandem.access")

# The request line and headers together; nginx allows 32 KiB, Node 16.
MAX_HEAD_BYTES = 64 * 1024


def refusal(error: TandemError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole error response, head and body, with a request id of its own, logged."""
    request_id = uuid.uuid4().hex
    access_log.info(
        "unparsed request %d; %s", error.status, error.message, extra={"request_id": request_id}
    )
    body = JSONResponse(error_body(error, request_id)).body  # as the app's own errors render
    status = http.HTTPStatus(error.status)
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}".encode(),
        *(name + b": " + value for name, value in default_headers),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        HEADER.encode() + b": " + request_id.encode(),
        b": ".join(NOSNIFF),
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class HttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering in the error shape, and counting the bytes and
    the time of each request's head until it ends, and of a new connection's wait for its
    first request. `receive_timeout_s` is set by protocol_class."""

    receive_timeout_s: float = 60.0
    counted: Callable[[int], None] = staticmethod(lambda status: None)  # each refusal's status
    _head_bytes: int | None = None  # None: no head under way
    _head_timer: asyncio.TimerHandle | None = None
    _owed = 0  # responses owed to requests read whole: being answered, or queued
    _refusal: TandemError | None = None  # to be sent once the responses owed are out

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._time_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._untime_head()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._time_head()

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._untime_head()
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:  # a request to answer
            self._owed += 1

    def on_response_complete(self) -> None:
        self._owed -= 1
        super().on_response_complete()  # starts the next pipelined request, if any
        if self._refusal is not None and not self._owed:
            self._send_refusal(self._refusal)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:  # what follows bytes already refused is not read
            return
        super().data_received(data)
        if self._head_bytes is None or self.transport.is_closing():
            return
        # All of `data` counts, though a head that ended in it stopped the count: a head is
        # refused at most one read past the bound.
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(HeadTooLarge(MAX_HEAD_BYTES))

    def send_400_response(self, msg: str) -> None:
        self._refuse(InvalidRequest(msg))

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn's own warns, and tells the operator to install a WebSocket library.
        access_log.debug("an upgrade request, served as plain HTTP")

    def _time_head(self) -> None:
        self._untime_head()
        self._head_timer = self.loop.call_later(self.receive_timeout_s, self._head_timed_out)

    def _untime_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes is None:  # nothing sent since the connection was made
            self.transport.close()
        else:
            self._refuse(ReceiveTimeout("head", self.receive_timeout_s))

    def _refuse(self, error: TandemError) -> None:
        """Refuse the request the bad bytes are in, once the requests before it are answered."""
        self._head_bytes = None
        self._untime_head()
        latest = self.cycle
        # Bytes in a request's own body make the refusal its answer: queued behind others, it
        # is withdrawn, never started; being answered, it is the last one owed.
        if _reading(latest) and not self._withdraw(latest):
            self._send_refusal(error)
        elif self._owed:
            self._refusal = error
            self.flow.pause_reading()
        else:
            self._send_refusal(error)

    def _withdraw(self, cycle: RequestResponseCycle) -> bool:
        """Take `cycle` out of the pipeline, if it is waiting there."""
        if not self.pipeline or self.pipeline[0][0] is not cycle:
            return False
        self.pipeline.popleft()  # uvicorn queues the newest on the left
        self._owed -= 1
        return True

    def _send_refusal(self, error: TandemError) -> None:
        self._refusal = None
        self.counted(error.status)
        self.transport.write(refusal(error, self.server_state.default_headers))
        self.transport.close()


def _reading(cycle: RequestResponseCycle | None) -> bool:
    """Whether `cycle`'s request is still arriving: its body not all read."""
    return cycle is not None and cycle.more_body and not cycle.response_complete


def protocol_class(
    receive_timeout_s: float, counted: Callable[[int], None] | None = None
) -> type[asyncio.Protocol]:
    """HttpTools, with a request's head to arrive within `receive_timeout_s`, telling
    `counted` the status of each request it refuses itself (for the metrics)."""
    settings: dict[str, object] = {"receive_timeout_s": receive_timeout_s}
    if counted is not None:
        settings["counted"] = staticmethod(counted)
    return type("HttpTools", (HttpTools,), settings)
