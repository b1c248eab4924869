"""Prometheus metrics: what this proxy saw (requests, fast inference), and what the job store
knows for every process (queue, job outcomes, accurate inference, agreement).

Each app has its own registry, so several apps in one process (tests) never share counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.api.guards import api_key_id_in
from tandem.cascade import Agreement
from tandem.errors import QueueUnavailable
from tandem.jobs.latency import AnswerLatency
from tandem.jobs.store import QueueStats, StoreSpace
from tandem.service import FastOutcome, TandemService
from tandem.webhooks import COUNTERS as WEBHOOK_COUNTERS

access_log = logging.getLogger("tandem.access")
# Where a route leaves what its request's access line should add (see annotate_access).
ACCESS_NOTE = "tandem.access_note"

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
OUTCOMES = ("done", "failed", "cancelled", "retried")
# The method and route of a request refused before its head was read or parsed.
UNPARSED = "unparsed"


@dataclass(frozen=True, slots=True)
class AccessNote:
    text: str
    job_id: str | None = None


def annotate_access(request: Request, text: str, job_id: str | None = None) -> None:
    """Add `text` (and a job id) to this request's access line: one line per request, logged
    after the response went out, instead of a line of the route's own before it."""
    request.scope.setdefault("state", {})[ACCESS_NOTE] = AccessNote(text, job_id)


@dataclass(frozen=True, slots=True)
class StoreView:
    """The store's side, read just before a scrape."""

    queue: QueueStats
    space: StoreSpace | None
    counts: dict[str, int]


class Snapshot:
    """What the next scrape shows of the store; `store` is None where it did not answer."""

    def __init__(self) -> None:
        self.store: StoreView | None = None
        self.watchers = 0


class _StoreCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        view = self.snapshot.store
        yield _gauge(
            "tandem_store_up",
            "1 if the job store answered this scrape; 0: Redis or the disk is away, and the"
            " metrics read from the store are left out.",
            view is not None,
        )
        if view is not None:
            # Left out, not zeroed, while the store is away: a counter at 0 would look reset.
            yield from _queue_and_room(view)
            yield from _outcomes(view.counts)
            yield from _accurate_side(view.counts)
        yield _gauge(
            "tandem_job_watchers", "Open SSE and long-poll watches.", self.snapshot.watchers
        )
        yield _gauge("tandem_asyncio_tasks", "Tasks alive in the event loop.", _tasks())


def _queue_and_room(view: StoreView) -> Iterable[Metric]:
    yield _gauge("tandem_queue_length", "Jobs waiting or running.", view.queue.depth)
    yield _gauge(
        "tandem_queue_oldest_age_seconds",
        "Age of the oldest unfinished job (0 when none).",
        view.queue.oldest_age_s,
    )
    if view.space is not None:
        yield _gauge(
            "tandem_store_used_bytes",
            "What the job store takes: the SQLite file and its WAL on disk, or the Redis"
            " server's memory.",
            view.space.used_bytes,
        )
        yield _gauge(
            "tandem_store_room_bytes",
            "What the job store may take more before it refuses new jobs: free disk above"
            " TANDEM_MIN_FREE_DISK_MB, or Redis's maxmemory (+Inf without one).",
            view.space.room_bytes,
        )


def _outcomes(counts: dict[str, int]) -> Iterable[Metric]:
    jobs = CounterMetricFamily(
        "tandem_jobs", "Jobs by outcome, from every worker.", labels=["outcome"]
    )
    for outcome in OUTCOMES:
        jobs.add_metric([outcome], counts.get(f"jobs_{outcome}", 0))
    yield jobs
    webhooks = CounterMetricFamily(
        "tandem_webhooks",
        "Webhook deliveries by outcome, from every worker; retried: an attempt failed and"
        " another follows.",
        labels=["outcome"],
    )
    for counter in WEBHOOK_COUNTERS.values():
        webhooks.add_metric([counter.removeprefix("webhooks_")], counts.get(counter, 0))
    yield webhooks


def _accurate_side(counts: dict[str, int]) -> Iterable[Metric]:
    yield CounterMetricFamily(
        "tandem_accurate_inference_seconds",
        "Accurate-model inference time summed over every worker's batches.",
        value=counts.get("accurate_inference_us", 0) / 1e6,
    )
    yield CounterMetricFamily(
        "tandem_accurate_images",
        "Images the accurate model classified.",
        value=counts.get("accurate_images", 0),
    )
    latency = AnswerLatency.from_counts(counts)
    yield HistogramMetricFamily(
        "tandem_accurate_answer_seconds",
        "From a job's acceptance to its accurate answer, over every worker: how long a"
        " client waited for it, queue and run.",
        buckets=list(latency.buckets),
        sum_value=latency.sum_s,
    )
    agreement = Agreement.from_counts(counts)
    yield CounterMetricFamily(
        "tandem_jobs_judged", "Jobs with both answers.", value=agreement.judged
    )
    yield _gauge(
        "tandem_model_agreement_ratio",
        "Share of judged jobs where both models gave the same top-1 (NaN before any).",
        agreement.agreement if agreement.agreement is not None else float("nan"),
    )


def _tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running loop
        return 0


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.snapshot = Snapshot()
        self.requests = Counter(
            "tandem_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tandem_http_request_duration_seconds",
            "HTTP request latency, to the end of the response.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "tandem_fast_inference_seconds",
            "Fast-model inference time in this proxy.",
            ["model"],
            buckets=_INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.client_requests = Counter(
            "tandem_client_requests",
            "With API keys: requests by client (its key's name, or digest), route and status; "
            "as many clients as keys configured, at most.",
            ["client", "route", "status"],
            registry=self.registry,
        )
        self.fast_answers = Counter(
            "tandem_fast_answers",
            "Fast answers given by this proxy, by what became of their job: queued, skipped "
            "(the cascade judged the fast answer enough), or the code of the store's refusal.",
            ["job"],
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(self.snapshot))

    def count_unparsed(self, status: int) -> None:
        """A request the server answered before the app saw it (see tandem.api.protocol)."""
        self.requests.labels(UNPARSED, UNPARSED, str(status)).inc()

    def observe_fast(self, outcome: FastOutcome) -> None:
        prediction = outcome.prediction
        self.inference.labels(prediction.model).observe(prediction.inference_ms / 1000.0)
        self.fast_answers.labels(outcome.fate).inc()

    async def render_for(self, service: TandemService) -> bytes:
        """Read the store's side, then render every metric: this process's own too while the
        store is away, when its 503s are what an operator wants to see."""
        try:
            self.snapshot.store = StoreView(
                queue=await service.queue_stats(),
                space=await service.store.space(),
                counts=await service.store.counts(),
            )
        except QueueUnavailable:
            self.snapshot.store = None
        self.snapshot.watchers = service.store.watchers
        return generate_latest(self.registry)


class AccessMiddleware:
    """Counts, times and logs every HTTP request: metrics under its route template
    (`/job/{job_id}`), so ids never become label values, and one access log line (inside the
    request-id middleware, so the line carries the id). Pure ASGI: a stream is timed to its
    last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            elapsed = time.perf_counter() - started
            method, route = scope["method"], self._route(scope)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(elapsed)
            note, key = scope.get("state", {}).get(ACCESS_NOTE), api_key_id_in(scope)
            if key is not None:
                self.metrics.client_requests.labels(key, route, str(status)).inc()
            access_log.info(
                '"%s %s" %d%s%s',
                method,
                scope["path"],
                status,
                f" key {key}" if key else "",  # which client: its key's name, or digest
                f"; {note.text}" if note else "",
                extra={
                    "method": method,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000.0, 2),
                    "job_id": note.job_id if note else None,
                    "api_key_id": key,
                },
            )

    def _route(self, scope: Scope) -> str:
        routed = scope.get("route")  # set by the router; absent if a guard answered first
        if routed is not None:
            return str(getattr(routed, "path", "unmatched"))
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"
