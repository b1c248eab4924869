"""uvicorn's HTTP protocol, with what it answers itself in Tandem's error shape, and a bound
on the size of a request's head.

A request uvicorn cannot parse (broken framing, a bad header line, a body longer than its
Content-Length) never reaches the app: uvicorn answered it in plain text and closed the
connection. This answers it as the app answers every other error, then closes as before.

httptools buffers a header until its end, however long: one connection sending a 200 MB
header took a proxy from 0.27 to 0.67 GB. A head past MAX_HEAD_BYTES gets 431 and the
connection closed (h11, used where httptools is missing, has its own bound of 16 KiB).

Tandem speaks no WebSocket (`tandem serve` runs uvicorn with `ws="none"`): a request to
upgrade is served as plain HTTP, where with a WebSocket library uvicorn had answered 403
with an empty body for want of a WebSocket route.
"""

from __future__ import annotations

import asyncio
import http
import importlib.util
import json
import logging
import uuid

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from tandem.api.errors import error_body
from tandem.api.middleware import HEADER
from tandem.errors import HeadTooLarge, InvalidRequest, TandemError

access_log = logging.getLogger("tandem.access")

# The request line and headers together; nginx allows 32 KiB, Node 16.
MAX_HEAD_BYTES = 64 * 1024


def refusal(error: TandemError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole error response, head and body, with a request id of its own, logged."""
    request_id = uuid.uuid4().hex
    access_log.info(
        "unparsed request %d; %s", error.status, error.message, extra={"request_id": request_id}
    )
    body = json.dumps(error_body(error, request_id)).encode()
    status = http.HTTPStatus(error.status)
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}".encode(),
        *(name + b": " + value for name, value in default_headers),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        HEADER.encode() + b": " + request_id.encode(),
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _Shaped:
    transport: asyncio.Transport
    server_state: ServerState

    def send_400_response(self, msg: str) -> None:
        self._refuse(InvalidRequest(msg))

    def _refuse(self, error: TandemError) -> None:
        self.transport.write(refusal(error, self.server_state.default_headers))
        self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn's own warns, and tells the operator to install a WebSocket library.
        access_log.debug("an upgrade request, served as plain HTTP")


class H11(_Shaped, H11Protocol):
    """h11's protocol, where httptools is not installed."""


def protocol_class() -> type[asyncio.Protocol]:
    """What uvicorn's "auto" picks (httptools when installed, else h11), shaped."""
    if importlib.util.find_spec("httptools") is None:
        return H11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpTools(_Shaped, HttpToolsProtocol):
        """httptools' protocol, counting the bytes of each request's head until it ends."""

        _head_bytes: int | None = None  # None: no head under way

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._head_bytes = None
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_bytes is None or self.transport.is_closing():
                return
            # All of `data` counts, though a head that ended in it stopped the count: a head
            # is refused at most one read past the bound.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._head_bytes = None
                self._refuse(HeadTooLarge(MAX_HEAD_BYTES))

    return HttpTools
