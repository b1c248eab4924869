"""What Tandem adds to OpenTelemetry's traces: the request's id and its fast answer on the
request's span, and, later, the accurate model's run of its job as a span in the same trace.

Tandem configures no SDK itself. Where the operator configures one (`opentelemetry-instrument`,
see the README's "Traces"), FastAPI traces each request, and the job stored for a traced
request keeps the trace's context as W3C headers, for the worker. Without an SDK no span
records and nothing is stored: a check on the request's side, a comparison on the job's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode

from tandem.api.paths import route_path
from tandem.jobs.records import Job

if TYPE_CHECKING:
    from tandem.service import FastOutcome

TRACER = "tandem"
# Probes and scrapes come every few seconds and tell nothing a trace would: not traced.
UNTRACED_PATHS = frozenset({"/health", "/health/all", "/metrics"})


def untraced(scope: Mapping[str, Any]) -> bool:
    """FastAPI's telemetry `exclude`: whether a request goes untraced."""
    return route_path(scope) in UNTRACED_PATHS


def current_context() -> dict[str, str] | None:
    """The trace context of the span in progress, as headers to store; None where no span
    records (no SDK configured, or the request not sampled)."""
    if not trace.get_current_span().is_recording():
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def tag_request(request_id: str) -> None:
    """The request's id on its span, where one records: an id from a log line or a client's
    `X-Request-ID` finds the trace, and the trace's id finds the log lines."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("tandem.request_id", request_id)


def describe_fast(outcome: FastOutcome) -> None:
    """The fast answer, its timings and its job on the request's span, where one records: a
    job's id finds its request's trace."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    prediction, timings = outcome.prediction, outcome.timings
    span.set_attributes(
        {
            "tandem.fast.model": prediction.model,
            "tandem.fast.label": prediction.label,
            "tandem.fast.probability": prediction.probability,
            "tandem.decode_ms": timings.decode_ms,
            "tandem.fast_ms": timings.fast_ms,
            "tandem.enqueue_ms": timings.enqueue_ms,
            "tandem.job": outcome.fate,
        }
    )
    if outcome.job is not None:
        span.set_attribute("tandem.job_id", outcome.job.id)


def record_failed_run(job: Job, model: str, *, error: str) -> None:
    """A failed run's span (see `running`)."""
    with running(job, model, error=error):
        pass


@contextlib.contextmanager
def running(
    job: Job, model: str, *, label: str | None = None, error: str | None = None
) -> Iterator[None]:
    """A span, in the trace of the request that queued `job`, for its run by `model`: from its
    claim to the end of the block, which follows its stored outcome; current within it, so the
    lines logged there carry its ids. Nothing for a job stored without a trace."""
    if job.trace is None:
        yield
        return
    span = _tracer().start_span(
        f"accurate {model}",
        context=propagate.extract(job.trace),
        kind=SpanKind.CONSUMER,
        start_time=_ns(job.updated_at),  # the claim's time: the job was running since
        attributes={
            "tandem.job_id": job.id,
            "tandem.model": model,
            "tandem.queued_s": max(job.updated_at - job.created_at, 0.0),
            # Past 1, an earlier run was lost (its worker died or hung), which left no span.
            "tandem.attempt": job.attempts,
        },
    )
    if job.request_id is not None:
        span.set_attribute("tandem.request_id", job.request_id)
    if error is not None:
        span.set_status(StatusCode.ERROR, error)
    else:
        span.set_attribute("tandem.label", label or "")
    with trace.use_span(span, end_on_exit=True):
        yield


@contextlib.contextmanager
def posting(job: Job, url: str, headers: dict[str, str]) -> Iterator[trace.Span]:
    """A client span for one post of `job`'s webhook, in its request's trace; `headers` then
    carry its context to the receiver, whose own trace goes on from it. An error raised
    within fails the span. For a job without a trace, a span that records nothing."""
    if job.trace is None:
        yield trace.INVALID_SPAN
        return
    target = urlsplit(url)  # host and port only: a query string may hold the client's token
    with _tracer().start_as_current_span(
        "webhook",
        context=propagate.extract(job.trace),
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": "POST",
            "server.address": target.hostname or "",
            "server.port": target.port or (443 if target.scheme == "https" else 80),
            "tandem.job_id": job.id,
        },
    ) as span:
        propagate.inject(headers)
        yield span


def answered(span: trace.Span, status: int) -> None:
    """The receiver's status on a webhook's span; one of 400 or more fails it."""
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_status(StatusCode.ERROR, f"HTTP {status}")


def _tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
