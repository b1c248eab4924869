"""Requests uvicorn cannot parse are answered in the one error shape, not in plain text."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest
import uvicorn

from tandem.api.protocol import MAX_HEAD_BYTES, protocol_class
from tests.support import (
    ServerProcess,
    encode,
    exchange,
    free_port,
    metric,
    noise,
    parse_head,
    read_response,
    tiny_env,
)

UNPARSEABLE = {
    "no request line": b"BLAH\r\n\r\n",
    "a bad content length": b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "a header without a colon": b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
}


def _assert_shaped(
    status: str,
    headers: dict[str, str],
    body: bytes,
    line: str = "HTTP/1.1 400 Bad Request",
    code: str = "invalid_request",
) -> None:
    assert status == line
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    # Byte for byte as the app renders its errors: compact, as one JSON shape should read.
    assert body == json.dumps(json.loads(body), separators=(",", ":")).encode()
    assert error["code"] == code
    if code == "invalid_request":
        assert error["message"] == "Invalid HTTP request received."
    assert error["request_id"] == headers["x-request-id"]


async def _app(scope: dict[str, object], receive: object, send: object) -> None:
    raise AssertionError("an unparsed request reached the app")


@pytest.fixture
def uvicorn_port() -> Iterator[int]:
    """uvicorn with Tandem's protocol, on a thread."""
    port = free_port()
    config = uvicorn.Config(
        _app, port=port, http=protocol_class(60.0), lifespan="off", log_config=None
    )
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
def test_the_protocol_answers_an_unparseable_request_in_the_error_shape(
    uvicorn_port: int, raw: bytes
) -> None:
    _assert_shaped(*exchange(uvicorn_port, raw))


def _responses(port: int, raw: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """Every response to `raw`, sent on a connection of its own, read until the server closes
    it (pipelined responses may come in one read: they are split by their lengths)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        while chunk := sock.recv(65536):
            received += chunk
    responses = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        status, headers = parse_head(head)
        length = int(headers["content-length"])
        responses.append((status, headers, rest[:length]))
        received = rest[length:]
    return responses


def test_tandem_serve_answers_a_body_past_its_content_length_in_the_error_shape(
    real_server: ServerProcess,
) -> None:
    """uvicorn's own answer was `Invalid HTTP request received.` in plain text. The request
    as its Content-Length framed it (4 bytes of a JPEG) is answered first."""
    request = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
    overrun = request + b"Content-Length: 4\r\n\r\n" + b"\xff\xd8\xff\xe0 and more, unframed"
    framed, (status, headers, body) = _responses(real_server.port, overrun)
    # The reason phrase is Python's: "Unprocessable Content" since 3.13 (RFC 9110).
    assert framed[0] == f"HTTP/1.1 422 {HTTPStatus(422).phrase}"
    assert json.loads(framed[2])["error"]["code"] == "invalid_image"
    _assert_shaped(status, headers, body)
    assert "server" not in headers  # nor the protocol's own answers
    assert "unparsed request 400" in real_server.log()
    with real_server.client() as client:
        scraped = client.get("/metrics").text
    unparsed = 'tandem_http_requests_total{method="unparsed",route="unparsed",status="400"}'
    assert metric(scraped, unparsed) >= 1


def test_requests_before_unparseable_bytes_are_answered_first_in_their_order(
    real_server: ServerProcess,
) -> None:
    """uvicorn wrote its 400 at once and closed: the pipelined request before the bad bytes
    was served, its job queued, and its response lost (logged as a 200 all the same)."""
    pipelined = (
        b"GET /predict/test HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"NOT HTTP\x00\r\n\r\n"
    )
    predicted, health, refused = _responses(real_server.port, pipelined)
    assert predicted[0] == health[0] == "HTTP/1.1 200 OK"
    job_id = json.loads(predicted[2])["job_id"]
    assert json.loads(health[2]) == {"health": "ok"}
    _assert_shaped(*refused)
    with real_server.client() as client:
        assert client.get(f"/job/{job_id}").status_code == 200


def test_a_pipelined_request_whose_own_body_is_bad_is_refused_not_started(
    real_server: ServerProcess,
) -> None:
    """Queued behind another, a request with a broken chunked body gets the refusal as its
    answer; started, it would have waited for a body that never comes."""
    pipelined = (
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nZZ not a chunk size\r\n"
    )
    started = time.monotonic()
    health, refused = _responses(real_server.port, pipelined)
    assert time.monotonic() - started < 5  # not after a receive timeout
    assert json.loads(health[2]) == {"health": "ok"}
    _assert_shaped(*refused)


def test_a_websocket_handshake_is_served_as_plain_http(real_server: ServerProcess) -> None:
    """It was 403 with an empty body: no route takes a WebSocket."""
    handshake = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    status, _, body = exchange(real_server.port, handshake)
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
    status, _, body = exchange(real_server.port, _with_header_of(MAX_HEAD_BYTES - 1024))
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(body) == {"health": "ok"}


@pytest.fixture(scope="module")
def impatient(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`tandem serve` that waits one second for a request's head or body."""
    data_dir = tmp_path_factory.mktemp("impatient")
    env = tiny_env(tiny_dir, data_dir, receive_timeout_s="1")
    server = ServerProcess(data_dir / "server.log", env, "--no-worker").start()
    yield server
    server.stop()


def _stalled(port: int, sent: bytes) -> tuple[bytes, float]:
    """What the server answers to `sent` and then silence, and after how long it closed."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(sent)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - started


@pytest.mark.parametrize(
    ("part", "sent"),
    [
        ("head", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Half"),
        (
            "body",
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n\x89PNG\r\n\x1a\n",
        ),
    ],
)
def test_a_request_that_stalls_gets_408_and_its_connection_closed(
    impatient: ServerProcess, part: str, sent: bytes
) -> None:
    """Neither uvicorn nor the body's guard bounded the time: a stalled client held its
    connection, and the part of a body it had sent, for good."""
    data, waited = _stalled(impatient.port, sent)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout")
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "receive_timeout"
    assert error["message"] == f"the request's {part} did not arrive within 1 s"
    assert 0.9 < waited < 5


def test_a_connection_that_sends_nothing_is_closed_after_the_receive_timeout(
    impatient: ServerProcess,
) -> None:
    data, waited = _stalled(impatient.port, b"")
    assert data == b""
    assert 0.9 < waited < 5


def test_a_slow_request_within_the_receive_timeout_is_served(impatient: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=10) as sock:
        for piece in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(0.3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        time.sleep(1.5)  # idle between requests: uvicorn's keep-alive (5 s) judges that
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")


def test_a_large_body_on_a_slow_link_is_served_though_it_outlasts_the_receive_timeout(
    impatient: ServerProcess,
) -> None:
    """A fixed time for the whole body had cut off a large photo on a slow but steady link:
    at the default 64 KiB/s minimum, each 32 KiB piece earns 0.5 s of the 0.25 s it takes."""
    image = encode(noise(300, 300), "PNG")
    assert len(image) > 8 * 32 * 1024  # over 2 s in all, twice the receive timeout
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n\r\n" % len(image)
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=10) as sock:
        sock.sendall(head)
        for offset in range(0, len(image), 32 * 1024):
            sock.sendall(image[offset : offset + 32 * 1024])
            time.sleep(0.25)
        status, _, body = read_response(sock)
    assert time.monotonic() - started > 2
    assert status == "HTTP/1.1 200 OK", body
    assert json.loads(body)["fast"]["model"] == "tiny_fast"
