"""The trace a job carries across the queue, against the OpenTelemetry SDK in memory (its
providers passed in: no global one is set for the rest of the suite)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
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


def _job(trace: dict[str, str] | None) -> Job:
    return Job(
        new_job_id(),
        JobStatus.RUNNING,
        created_at=100.0,
        updated_at=102.5,
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
    tracing.record_run(job, "lite2", label="tabby")
    span = _the_span(exported)
    assert span.name == "accurate lite2"
    assert span.kind is SpanKind.CONSUMER
    assert (span.context.trace_id, span.parent.span_id) == (TRACE_ID, PARENT_ID)  # type: ignore[union-attr]
    assert span.start_time == 102_500_000_000
    assert dict(span.attributes or {}) == {
        "tandem.job_id": job.id,
        "tandem.model": "lite2",
        "tandem.queued_s": 2.5,
        "tandem.request_id": "req-1",
        "tandem.label": "tabby",
    }
    assert span.status.status_code is StatusCode.UNSET


def test_a_failed_run_is_an_error_span_with_its_reason(exported: InMemorySpanExporter) -> None:
    tracing.record_run(_job({"traceparent": TRACEPARENT}), "lite2", error="inference failed")
    span = _the_span(exported)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "inference failed"
    assert "tandem.label" not in (span.attributes or {})


def test_a_job_stored_without_a_trace_records_no_span(exported: InMemorySpanExporter) -> None:
    tracing.record_run(_job(None), "lite2", label="tabby")
    assert exported.get_finished_spans() == ()
