"""uvicorn's HTTP protocol, answering a request it cannot parse in Tandem's error shape.

Such a request (broken framing, a bad header line, a body longer than its Content-Length)
never reaches the app: uvicorn answers it itself, in plain text, and closes the connection.
This answers it as the app answers every other error, then closes as uvicorn does.

Tandem speaks no WebSocket (`tandem serve` runs uvicorn with `ws="none"`): a request to
upgrade is served as plain HTTP, where with a WebSocket library uvicorn had answered 403
with an empty body for want of a WebSocket route.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import uuid

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from tandem.api.errors import error_body
from tandem.api.middleware import HEADER
from tandem.errors import InvalidRequest

access_log = logging.getLogger("tandem.access")


def bad_request(message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole 400 response, head and body, with a request id of its own, logged."""
    request_id = uuid.uuid4().hex
    access_log.info("unparsed request 400; %s", message, extra={"request_id": request_id})
    body = json.dumps(error_body(InvalidRequest(message), request_id)).encode()
    head = [
        b"HTTP/1.1 400 Bad Request",
        *(name + b": " + value for name, value in default_headers),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        HEADER.encode() + b": " + request_id.encode(),
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _ShapedBadRequest:
    transport: asyncio.Transport
    server_state: ServerState

    def send_400_response(self, msg: str) -> None:
        self.transport.write(bad_request(msg, self.server_state.default_headers))
        self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn's own warns, and tells the operator to install a WebSocket library.
        access_log.debug("an upgrade request, served as plain HTTP")


class H11(_ShapedBadRequest, H11Protocol):
    """h11's protocol, where httptools is not installed."""


def protocol_class() -> type[asyncio.Protocol]:
    """What uvicorn's "auto" picks (httptools when installed, else h11), shaped."""
    if importlib.util.find_spec("httptools") is None:
        return H11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpTools(_ShapedBadRequest, HttpToolsProtocol):
        """httptools' protocol."""

    return HttpTools
