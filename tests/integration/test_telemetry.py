"""OpenTelemetry as the README turns it on: `tandem serve` and `tandem worker` run under
`opentelemetry-instrument`, exporting OTLP over HTTP to a collector the test runs; each
request is a span, and each traced job's accurate run a span in its request's trace."""

from __future__ import annotations

import http.server
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as WireSpan

from tests.support import (
    RedisServer,
    ServerProcess,
    UpProcess,
    WorkerProcess,
    encode,
    noise,
    tiny_env,
    wait_for_job,
)

pytestmark = pytest.mark.timeout(120)

# The client's own trace, which the request continues (W3C traceparent).
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    attributes: dict[str, Any]
    error: str | None


class Collector:
    """An OTLP/HTTP endpoint that keeps the spans exported to it; and, at /hook, a webhook
    receiver that keeps the headers of each post."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.hooks: list[dict[str, str]] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    collector.receive(body)
                elif self.path == "/hook":
                    collector.hooks.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def receive(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = [
            _span(span)
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
        with self._lock:
            self.spans.extend(spans)

    def wait_for(self, name: str, count: int = 1, timeout: float = 30.0) -> list[Span]:
        """The spans named `name`, once there are `count` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [span for span in self.spans if span.name == name]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no span {name!r} in {[s.name for s in self.spans]}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _span(span: WireSpan) -> Span:
    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
    error = span.status.message if span.status.code == span.status.STATUS_CODE_ERROR else None
    return Span(
        span.name,
        span.trace_id.hex(),
        span.span_id.hex(),
        span.parent_span_id.hex(),
        span.kind,
        span.start_time_unix_nano,
        attributes,
        error,
    )


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector()
    yield collector
    collector.close()


def _exporting(env: dict[str, str], collector: Collector) -> dict[str, str]:
    """The environment an operator sets to export traces, and only traces, to `collector`."""
    return env | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_EXPORTER": "otlp_proto_http",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: spans leave at once, not every 5 s
    }


def _instrument(command: list[str]) -> list[str]:
    """The command run under `opentelemetry-instrument`, which configures the SDK."""
    return [str(Path(sys.executable).parent / "opentelemetry-instrument"), *command]


class InstrumentedServer(ServerProcess):
    def command(self) -> list[str]:
        return _instrument(super().command())


class InstrumentedWorker(WorkerProcess):
    def command(self) -> list[str]:
        return _instrument(super().command())


class InstrumentedUp(UpProcess):
    def command(self) -> list[str]:
        return _instrument(super().command())


def _the_one(spans: list[Span]) -> Span:
    assert len(spans) == 1, spans
    return spans[0]


def test_each_request_is_a_span_named_by_its_route_and_a_job_s_run_joins_its_trace(
    tiny_dir: Path, tmp_path: Path, collector: Collector
) -> None:
    settings = {"webhook_hosts": "127.0.0.1", "webhook_secret": "s" * 16, "log_format": "json"}
    env = _exporting(tiny_env(tiny_dir, tmp_path, **settings), collector)
    server = InstrumentedServer(tmp_path / "server.log", env).start()
    try:
        with server.client() as client:
            assert client.get("/metrics").status_code == 200
            image = encode(noise(64, 48))
            headers = {"Content-Type": "image/jpeg", "traceparent": TRACEPARENT}
            hook = {"callback_url": f"{collector.url}/hook"}
            posted = client.post("/predict", content=image, headers=headers, params=hook)
            assert posted.status_code == 200
            job = wait_for_job(client, posted.json()["job_id"])
            assert client.post("/predict", json={"image": "!"}).status_code == 422
            assert collector.wait_for("GET /job/{job_id}")  # by its route, not a job id
            request, refused = sorted(
                collector.wait_for("POST /predict", 2), key=lambda s: s.trace_id != CLIENT_TRACE
            )
            run = _the_one(collector.wait_for("accurate tiny_accurate"))
            webhook = _the_one(collector.wait_for("webhook"))
    finally:
        server.stop()
    # DirectRoute serves /predict outside FastAPI's router, and still names its route.
    assert request.attributes["http.route"] == "/predict"
    assert request.attributes["http.response.status_code"] == 200
    assert (request.trace_id, request.parent_id) == (CLIENT_TRACE, CLIENT_SPAN)
    # The fast answer and the job on the request's span: a job's id finds its trace.
    assert request.attributes["tandem.job_id"] == job["job_id"]
    assert request.attributes["tandem.job"] == "queued"
    assert request.attributes["tandem.fast.label"] == posted.json()["fast"]["top_k"][0]["label"]
    assert request.attributes["tandem.fast_ms"] > 0
    # The request id, of the log lines and the client's X-Request-ID, on both spans.
    request_id = posted.headers["x-request-id"]
    assert request.attributes["tandem.request_id"] == request_id
    assert refused.attributes["tandem.request_id"]
    assert refused.attributes["http.response.status_code"] == 422
    # The accurate answer, later, in the request's trace: a child of its server span.
    assert (run.trace_id, run.parent_id) == (CLIENT_TRACE, request.span_id)
    assert run.kind == WireSpan.SPAN_KIND_CONSUMER
    assert run.attributes["tandem.job_id"] == job["job_id"]
    assert run.attributes["tandem.request_id"] == request_id
    assert run.attributes["tandem.label"] == job["accurate"]["top_k"][0]["label"]
    assert run.start_ns >= request.start_ns
    assert run.error is None
    # The webhook's post, in the same trace, and its context carried to the receiver.
    assert (webhook.trace_id, webhook.parent_id) == (CLIENT_TRACE, request.span_id)
    assert webhook.kind == WireSpan.SPAN_KIND_CLIENT
    assert webhook.attributes["http.response.status_code"] == 200
    (received,) = collector.hooks
    assert received["traceparent"] == f"00-{CLIENT_TRACE}-{webhook.span_id}-01"
    # The JSON log lines name the span they were logged in: the request's access line, and
    # the worker's line about the job.
    lines = [
        json.loads(line) for line in server.log_path.read_text().splitlines() if line[:1] == "{"
    ]
    about = [line for line in lines if line.get("job_id") == job["job_id"]]
    access = next(line for line in about if line["logger"] == "tandem.access")
    done = next(line for line in about if line["logger"] == "tandem.worker")
    assert (access["trace_id"], access["span_id"]) == (CLIENT_TRACE, request.span_id)
    assert (done["trace_id"], done["span_id"]) == (CLIENT_TRACE, run.span_id)
    # Probes (the test's own, as it waited for the server) and scrapes are not traced.
    assert {"GET /health", "GET /metrics"}.isdisjoint(s.name for s in collector.spans)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_standalone_worker_under_opentelemetry_instrument_joins_the_trace(
    tiny_dir: Path, tmp_path: Path, collector: Collector, request: pytest.FixtureRequest, store: str
) -> None:
    """The proxy and the worker are processes apart, sharing a SQLite file or a Redis."""
    env = _exporting(tiny_env(tiny_dir, tmp_path), collector)
    if store == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        env |= {"TANDEM_REDIS_URL": redis.url, "TANDEM_REDIS_PREFIX": f"traces{os.getpid()}"}
    server = InstrumentedServer(tmp_path / "server.log", env, "--no-worker").start()
    worker = None
    try:
        with server.client() as client:
            headers = {"Content-Type": "image/png", "traceparent": TRACEPARENT}
            posted = client.post("/predict", content=encode(noise(64, 48), "PNG"), headers=headers)
            undecodable = client.post(
                "/predict",
                content=b"\x89PNG\r\n\x1a\n not a picture",
                headers=headers | {"traceparent": f"00-{'1' * 32}-{CLIENT_SPAN}-01"},
            )
            assert posted.status_code == 200, posted.text
            assert undecodable.status_code == 422  # refused at once: no job, so no run
            worker = InstrumentedWorker(tmp_path / "worker.log", env).start()
            job = wait_for_job(client, posted.json()["job_id"])
            run = _the_one(collector.wait_for("accurate tiny_accurate"))
            served = _the_one(
                [s for s in collector.wait_for("POST /predict", 2) if s.trace_id == CLIENT_TRACE]
            )
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
    assert job["status"] == "done"
    assert f"jobs in {'Redis' if store == 'redis' else 'SQLite'}" in server.log_path.read_text()
    assert (run.trace_id, run.parent_id) == (CLIENT_TRACE, served.span_id)
    assert run.attributes["tandem.job_id"] == job["job_id"]
    # It waited in the queue until the worker started; its first run.
    assert run.attributes["tandem.queued_s"] > 0
    assert run.attributes["tandem.attempt"] == 1


def test_tandem_up_under_opentelemetry_instrument_traces_its_proxy_and_workers(
    tiny_dir: Path, tmp_path: Path, collector: Collector
) -> None:
    """`tandem up` hands its environment on: the proxy and the worker it starts are traced
    too, a job's run by the worker process in its request's trace (a hand check before)."""
    env = _exporting(tiny_env(tiny_dir, tmp_path, worker_poll_s="0.2"), collector)
    up = InstrumentedUp(tmp_path / "up.log", env, "--workers", "1").start()
    try:
        with up.client() as client:
            headers = {"Content-Type": "image/png", "traceparent": TRACEPARENT}
            posted = client.post("/predict", content=encode(noise(64, 48), "PNG"), headers=headers)
            assert posted.status_code == 200, posted.text
            job = wait_for_job(client, posted.json()["job_id"])
            run = _the_one(collector.wait_for("accurate tiny_accurate"))
            served = _the_one(
                [s for s in collector.wait_for("POST /predict") if s.trace_id == CLIENT_TRACE]
            )
    finally:
        up.signal(signal.SIGINT)
        assert up.wait_exit(timeout=60) == 0
    assert job["status"] == "done"
    assert (run.trace_id, run.parent_id) == (CLIENT_TRACE, served.span_id)
    assert run.attributes["tandem.job_id"] == job["job_id"]
