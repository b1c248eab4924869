"""The trace a job carries across the queue, against the OpenTelemetry SDK in memory (its
providers passed in: no global one is set for the rest of the suite)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from tandem import tracing
from tandem.jobs.records import Job, JobStatus, new_job_id

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", lambda: provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def _job(trace: dict[str, str] | None, attempts: int = 1) -> Job:
    return Job(
        new_job_id(),
        JobStatus.RUNNING,
        created_at=100.0,
        updated_at=102.5,
        attempts=attempts,
        request_id="req-1",
        trace=trace,
    )


def _the_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


def test_a_recording_span_s_context_is_what_a_job_keeps() -> None:
    assert tracing.current_context() is None  # no span at all
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        context = tracing.current_context()
    assert context is not None
    assert context["traceparent"].split("-")[1] == f"{span.get_span_context().trace_id:032x}"


def test_a_span_that_is_not_sampled_leaves_no_context() -> None:
    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    with tracer.start_as_current_span("request"):
        assert tracing.current_context() is None


def test_a_run_is_a_consumer_span_in_its_request_s_trace_from_the_claim(
    exported: InMemorySpanExporter,
) -> None:
    job = _job({"traceparent": TRACEPARENT})
    with tracing.running(job, "lite2", label="tabby"):
        # Current within the block: a line logged there names the run's span.
        inside = trace.get_current_span().get_span_context()
    span = _the_span(exported)
    assert (inside.trace_id, inside.span_id) == (TRACE_ID, span.context.span_id)
    assert span.name == "accurate lite2"
    assert span.kind is SpanKind.CONSUMER
    assert (span.context.trace_id, span.parent.span_id) == (TRACE_ID, PARENT_ID)  # type: ignore[union-attr]
    assert span.start_time == 102_500_000_000
    assert dict(span.attributes or {}) == {
        "tandem.job_id": job.id,
        "tandem.model": "lite2",
        "tandem.queued_s": 2.5,
        "tandem.attempt": 1,
        "tandem.request_id": "req-1",
        "tandem.label": "tabby",
    }
    assert span.status.status_code is StatusCode.UNSET


def test_a_run_after_one_lost_with_its_worker_says_which_attempt_it_is(
    exported: InMemorySpanExporter,
) -> None:
    """A worker that dies mid-run exports no span; the run that takes its job over is the
    trace's sign of it."""
    with tracing.running(_job({"traceparent": TRACEPARENT}, attempts=2), "lite2", label="tabby"):
        pass
    assert (_the_span(exported).attributes or {})["tandem.attempt"] == 2


def test_a_failed_run_is_an_error_span_with_its_reason(exported: InMemorySpanExporter) -> None:
    tracing.record_failed_run(_job({"traceparent": TRACEPARENT}), "lite2", error="inference failed")
    span = _the_span(exported)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "inference failed"
    assert "tandem.label" not in (span.attributes or {})


def test_a_job_stored_without_a_trace_records_no_span(exported: InMemorySpanExporter) -> None:
    with tracing.running(_job(None), "lite2", label="tabby"):
        assert not trace.get_current_span().is_recording()
    assert exported.get_finished_spans() == ()


def test_a_webhook_post_is_a_client_span_whose_context_the_receiver_gets(
    exported: InMemorySpanExporter,
) -> None:
    job = _job({"traceparent": TRACEPARENT})
    headers = {"Content-Type": "application/json"}
    with tracing.posting(job, "https://hooks.example.com/in?token=secret", headers) as span:
        tracing.answered(span, 204)
    posted = _the_span(exported)
    assert (posted.name, posted.kind) == ("webhook", SpanKind.CLIENT)
    assert (posted.context.trace_id, posted.parent.span_id) == (TRACE_ID, PARENT_ID)  # type: ignore[union-attr]
    assert headers["traceparent"] == f"00-{TRACE_ID:032x}-{posted.context.span_id:016x}-01"
    attributes = dict(posted.attributes or {})
    assert attributes["server.address"] == "hooks.example.com"
    assert attributes["server.port"] == 443
    assert attributes["http.response.status_code"] == 204
    assert "secret" not in str(attributes)  # the URL's query is not recorded
    assert posted.status.status_code is StatusCode.UNSET


def test_a_refused_or_failed_webhook_post_fails_its_span(exported: InMemorySpanExporter) -> None:
    job = _job({"traceparent": TRACEPARENT})
    with tracing.posting(job, "http://127.0.0.1:9/hook", {}) as span:
        tracing.answered(span, 503)
    with pytest.raises(TimeoutError), tracing.posting(job, "http://127.0.0.1:9/hook", {}):
        raise TimeoutError("no answer within 5 s")
    refused, failed = exported.get_finished_spans()
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.status.description == "HTTP 503"
    assert failed.status.status_code is StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception"]


def test_an_untraced_job_s_webhook_carries_no_trace(exported: InMemorySpanExporter) -> None:
    headers: dict[str, str] = {}
    with tracing.posting(_job(None), "http://127.0.0.1:9/hook", headers) as span:
        tracing.answered(span, 200)
    assert headers == {}
    assert exported.get_finished_spans() == ()
