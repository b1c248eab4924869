"""Requests uvicorn cannot parse are answered in the one error shape, not in plain text."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from tandem.api.protocol import H11, MAX_HEAD_BYTES, protocol_class
from tests.support import ServerProcess, free_port

UNPARSEABLE = {
    "no request line": b"BLAH\r\n\r\n",
    "a bad content length": b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "a header without a colon": b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
}


def _exchange(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """The first response to `raw`, read up to its Content-Length."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        while len(body) < int(headers.get("content-length", 0)):
            body += sock.recv(65536)
    return status, headers, body


def _assert_shaped(
    status: str,
    headers: dict[str, str],
    body: bytes,
    line: str = "HTTP/1.1 400 Bad Request",
    code: str = "invalid_request",
) -> None:
    assert status == line
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == code
    if code == "invalid_request":
        assert error["message"] == "Invalid HTTP request received."
    assert error["request_id"] == headers["x-request-id"]


async def _app(scope: dict[str, object], receive: object, send: object) -> None:
    raise AssertionError("an unparsed request reached the app")


@pytest.fixture(params=["auto", "h11"])
def uvicorn_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """uvicorn with Tandem's protocol (as `tandem serve` picks it, and h11), on a thread."""
    cls = protocol_class() if request.param == "auto" else H11
    port = free_port()
    config = uvicorn.Config(_app, port=port, http=cls, lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("raw", UNPARSEABLE.values(), ids=UNPARSEABLE.keys())
def test_each_protocol_answers_an_unparseable_request_in_the_error_shape(
    uvicorn_port: int, raw: bytes
) -> None:
    _assert_shaped(*_exchange(uvicorn_port, raw))


def test_tandem_serve_answers_a_body_past_its_content_length_in_the_error_shape(
    real_server: ServerProcess,
) -> None:
    """uvicorn's own answer was `Invalid HTTP request received.` in plain text."""
    request = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
    overrun = request + b"Content-Length: 4\r\n\r\n" + b"\xff\xd8\xff\xe0 and more, unframed"
    _assert_shaped(*_exchange(real_server.port, overrun))
    assert "unparsed request 400" in real_server.log()


def test_a_websocket_handshake_is_served_as_plain_http(real_server: ServerProcess) -> None:
    """It was 403 with an empty body: no route takes a WebSocket."""
    handshake = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    status, _, body = _exchange(real_server.port, handshake)
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(body) == {"health": "ok"}
    assert "WebSocket library" not in real_server.log()


def _with_header_of(size: int) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"


def test_a_head_past_its_bound_gets_431_without_being_read_to_its_end(
    real_server: ServerProcess,
) -> None:
    """httptools buffered a header however long: 200 MB of one took a proxy to 0.67 GB."""
    with socket.create_connection(("127.0.0.1", real_server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        with contextlib.suppress(OSError):  # the server closes once it has refused
            for _ in range(4096):  # 256 MiB, were it all read
                sock.sendall(b"a" * 65536)
        response = sock.recv(65536)
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    line = "HTTP/1.1 431 Request Header Fields Too Large"
    _assert_shaped(status, headers, body, line, "headers_too_large")
    assert json.loads(body)["error"]["details"] == {"max_bytes": MAX_HEAD_BYTES}


def test_a_head_within_its_bound_is_served(real_server: ServerProcess) -> None:
    status, _, body = _exchange(real_server.port, _with_header_of(MAX_HEAD_BYTES - 1024))
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(body) == {"health": "ok"}
