"""The client's reading of the wire: event streams, error bodies, and when to send again."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from tandem.cli import main
from tandem.client import AsyncClient, Client, EventParser, JobResult
from tandem.client_cli import EXIT_REFUSED, EXIT_SERVER
from tandem.errors import (
    JobNotFound,
    Overloaded,
    QueueFull,
    TandemError,
    TooManyQueued,
    TooManyRequests,
    UnreadableJob,
    error_from_wire,
)
from tandem.predictions import Prediction, Scored

JOB_ID = "0" * 32
QUEUED = {"job_id": JOB_ID, "status": "queued", "fast": None, "accurate": None}
UNREADABLE = {
    "error": {
        "code": "unreadable_job",
        "message": "job's stored record cannot be read",
        "request_id": "r-1",
        "details": {"job_id": JOB_ID},
    }
}


def fed(parser: EventParser, *lines: str) -> list[JobResult]:
    return [event for line in lines if (event := parser.feed(line)) is not None]


def test_each_event_is_a_job_state_and_comments_are_skipped() -> None:
    parser = EventParser()
    events = fed(parser, ": keep-alive", "", "event: queued", f"data: {json.dumps(QUEUED)}", "")
    assert [event.status for event in events] == ["queued"]


def test_an_error_event_raises_the_typed_error_with_its_class_status() -> None:
    parser = EventParser()
    fed(parser, "event: queued", f"data: {json.dumps(QUEUED)}", "")
    fed(parser, "event: error", f"data: {json.dumps(UNREADABLE)}")
    with pytest.raises(UnreadableJob) as raised:
        parser.feed("")
    error = raised.value
    assert (error.status, error.request_id, error.details) == (500, "r-1", {"job_id": JOB_ID})


def test_an_http_status_overrides_the_class_status_and_unknown_codes_stay_generic() -> None:
    gone = {"error": {"code": "job_not_found", "message": "no such job", "details": {}}}
    assert isinstance(error_from_wire(404, gone), JobNotFound)
    novel = error_from_wire(418, {"error": {"code": "teapot", "message": "short and stout"}})
    assert type(novel) is TandemError
    assert (novel.status, novel.details) == (418, {"code": "teapot"})


FAST = {"fast": Prediction("m", (Scored(1, "one", 0.9),), 1.0).to_dict(), "job_id": JOB_ID}


class _Scripted(BaseHTTPRequestHandler):
    """Answers each POST with the next of the server's `answers`: (status, headers, body)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        server: _Server = self.server  # type: ignore[assignment]
        status, headers, body = server.answers.pop(0)
        server.posts += 1
        server.headers.append({k.lower(): v for k, v in self.headers.items()})
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    answers: list[tuple[int, dict[str, str], dict[str, object]]]
    posts = 0
    headers: list[dict[str, str]]


@pytest.fixture
def scripted() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Scripted)
    server.headers = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _refusal(status: int, code: str) -> tuple[int, dict[str, str], dict[str, object]]:
    body = {"error": {"code": code, "message": code, "request_id": "r", "details": {}}}
    return status, {"Retry-After": "0"}, body


def _url(server: _Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_a_server_too_busy_is_sent_the_image_again_after_the_wait_it_asks_for(
    scripted: _Server,
) -> None:
    scripted.answers = [_refusal(429, "too_many_requests"), _refusal(503, "overloaded")]
    scripted.answers.append((200, {}, FAST))
    with Client(_url(scripted)) as client:
        assert client.predict(b"image").job_id == JOB_ID
    assert scripted.posts == 3


def test_busy_refusals_past_the_retries_are_raised_typed(scripted: _Server) -> None:
    scripted.answers = [_refusal(429, "too_many_requests")] * 2
    with Client(_url(scripted), busy_retries=1) as client, pytest.raises(TooManyRequests):
        client.predict(b"image")
    assert scripted.posts == 2
    scripted.answers = [_refusal(503, "overloaded")]
    with Client(_url(scripted), busy_retries=0) as client, pytest.raises(Overloaded):
        client.predict(b"image")
    assert scripted.posts == 3


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [(503, "queue_full", QueueFull), (429, "too_many_queued", TooManyQueued)],
)
def test_a_full_queue_is_not_sent_again(
    scripted: _Server, status: int, code: str, error: type[TandemError]
) -> None:
    """Its refusal carries the fast answer: the request was served, without a job."""
    full = _refusal(status, code)
    scripted.answers = [(status, full[1], {**FAST, "job_id": None, **full[2]})]
    with Client(_url(scripted)) as client:
        fast = client.predict(b"image")
    assert not fast.queued
    assert isinstance(fast.not_queued, error)
    assert fast.not_queued.status == status
    assert scripted.posts == 1


async def test_the_async_client_sends_again_alike(scripted: _Server) -> None:
    scripted.answers = [_refusal(429, "too_many_requests"), (200, {}, FAST)]
    async with AsyncClient(_url(scripted)) as client:
        assert (await client.predict(b"image")).job_id == JOB_ID
    assert scripted.posts == 2
    with pytest.raises(ValueError, match="busy_retries"):
        AsyncClient(_url(scripted), busy_retries=-1)


def test_tandem_predict_tells_a_server_that_stayed_busy_from_a_refused_image(
    scripted: _Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 429 says nothing of the image: scripts retry later, as after a 503."""
    image = tmp_path / "cat.png"
    image.write_bytes(b"image")
    scripted.answers = [_refusal(429, "too_many_requests")] * 4
    assert main(["predict", str(image), "--url", _url(scripted)]) == EXIT_SERVER
    assert scripted.posts == 4  # the first try and 3 retries
    scripted.answers = [_refusal(422, "invalid_image")]
    assert main(["predict", str(image), "--url", _url(scripted)]) == EXIT_REFUSED
    capsys.readouterr()


def test_a_key_no_header_can_carry_is_refused_before_anything_is_sent(
    scripted: _Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """httpx had failed each request deep in its send (UnicodeEncodeError): `tandem predict`
    printed a traceback."""
    key = "\u043a\u043b\u044e\u0447"
    for client in (Client, AsyncClient):
        with pytest.raises(ValueError, match="printable ASCII") as caught:
            client(_url(scripted), api_key=key)
        assert key not in str(caught.value)
    image = tmp_path / "cat.png"
    image.write_bytes(b"image")
    with pytest.raises(SystemExit) as usage:
        main(["predict", str(image), "--url", _url(scripted), "--api-key", key])
    assert usage.value.code == 2
    assert "--api-key: an API key is printable ASCII" in capsys.readouterr().err
    assert scripted.posts == 0


async def test_a_call_made_within_a_traced_span_carries_its_trace(scripted: _Server) -> None:
    """The caller's trace goes on in the server's spans, and its job's. Outside a span, and
    within one that is not sampled, nothing is sent."""
    scripted.answers = [(200, {}, FAST) for _ in range(4)]
    tracer = TracerProvider().get_tracer("test")
    with Client(_url(scripted)) as client, tracer.start_as_current_span("caller") as span:
        client.predict(b"image")
    async with AsyncClient(_url(scripted)) as async_client:
        with tracer.start_as_current_span("caller, async") as async_span:
            await async_client.predict(b"image")
        await async_client.predict(b"image")
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("off")
    with Client(_url(scripted)) as client, unsampled.start_as_current_span("off"):
        client.predict(b"image")
    sent = [headers.get("traceparent") for headers in scripted.headers]
    traced = [value.split("-")[1:3] if value else None for value in sent]  # trace, parent
    expected = [
        [f"{s.get_span_context().trace_id:032x}", f"{s.get_span_context().span_id:016x}"]
        for s in (span, async_span)
    ]
    assert traced == [*expected, None, None]


def test_events_read_the_job_while_the_server_has_no_stream_and_ride_out_a_failed_read() -> None:
    """A 429 to the stream: the job is read instead. That read failing (the proxy gone for a
    moment) is not raised: the next stream meets the server, with its reconnects."""
    busy = httpx.Response(
        429, headers={"Retry-After": "0"}, json=_refusal(429, "too_many_requests")[2]
    )
    done = {**QUEUED, "status": "done"}
    answers: list[httpx.Response | Exception] = [
        busy,
        httpx.ConnectError("refused"),
        busy,
        httpx.Response(200, json=QUEUED),
        httpx.Response(200, text=f"event: done\ndata: {json.dumps(done)}\n\n"),
    ]
    paths: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        given = answers.pop(0)
        if isinstance(given, Exception):
            raise given
        return given

    with Client("http://tandem.test") as client:
        client._http = httpx.Client(
            base_url="http://tandem.test", transport=httpx.MockTransport(answer)
        )
        states = [state.status for state in client.events(JOB_ID)]
    assert states == ["queued", "done"]
    stream, read = f"/job/{JOB_ID}/events", f"/job/{JOB_ID}"
    assert paths == [stream, read, stream, read, stream]
