"""The application factory. Nothing happens at import: models load in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from tandem import __version__, heap, tracing
from tandem.api.direct import DirectRoute
from tandem.api.errors import install_error_handlers
from tandem.api.guards import OPEN_PATHS, ApiKeys, BodyLimit, Deadline, LoadShedder
from tandem.api.metrics import AccessMiddleware, Metrics
from tandem.api.middleware import HeadAsGet, RequestIdMiddleware
from tandem.api.paths import PassedOnPrefix
from tandem.api.routes import predict, route_of, router
from tandem.errors import QueueUnavailable, ServiceUnavailable
from tandem.jobs.factory import make_store, store_location
from tandem.jobs.store import JobStore
from tandem.keys import parse_keys
from tandem.runtime.classifier import Classifier, Spin, ThreadPlan, load_classifier
from tandem.runtime.manifest import model_name
from tandem.runtime.priority import GiveWay
from tandem.service import TandemService
from tandem.settings import Settings
from tandem.tasks import stop
from tandem.worker import Worker, config_from

log = logging.getLogger("tandem.api")

EMBEDDED_WORKER_NICE = 10
# How long shutdown waits for the embedded worker's batch in hand; its lease covers the rest.
WORKER_STOP_S = 30.0
# Requests are counted for /stats in memory and written to the store this often.
STATS_FLUSH_S = 2.0


@dataclass
class _Running:
    """What the lifespan started and must stop, in reverse order."""

    store: JobStore
    service: TandemService | None = None
    worker_stop: asyncio.Event = field(default_factory=asyncio.Event)
    worker_task: asyncio.Task[None] | None = None
    flusher: asyncio.Task[None] | None = None


async def _load(ref: str, settings: Settings, plan: ThreadPlan) -> Classifier:
    return await asyncio.to_thread(load_classifier, ref, settings.model_dir, plan)


async def _startup(settings: Settings, running: _Running) -> TandemService:
    await running.store.open()
    fast = await _load(settings.fast_model, settings, settings.fast_plan)
    accurate_name = model_name(settings.accurate_model, settings.model_dir)
    service = TandemService(
        running.store,
        fast,
        accurate_name,
        top_k=settings.top_k,
        limits=settings.image_limits,
        concurrency=settings.fast_concurrency,
        retry_after_s=settings.retry_after_s,
        fast_timeout_s=settings.fast_timeout_s,
        gate=settings.gate,
        max_watches=settings.max_watches,
        max_watches_per_key=settings.max_watches_per_key,
        private_jobs=settings.private_jobs,
    )
    running.service = service
    await service.warm_up()
    running.flusher = asyncio.create_task(_flush_stats_forever(service), name="tandem-stats")
    if settings.runs_worker:
        running.worker_task = await _start_worker(settings, running, service)
    log.info(
        "tandem %s serving %s now, %s later; jobs in %s",
        __version__,
        fast.name,
        accurate_name,
        store_location(settings),
    )
    return service


async def _start_worker(
    settings: Settings, running: _Running, service: TandemService
) -> asyncio.Task[None]:
    # Beside the fast model the accurate one must not compete as an equal: not spinning, at a
    # lower priority, and (unless told otherwise) only while the fast model is idle. Giving way,
    # a run has every core until a fast call stops it; one that waited out its patience runs
    # beside the fast model on one thread.
    give_way = (
        GiveWay(service.calls, settings.give_way_quiet_s, settings.give_way_patience_s)
        if settings.embedded_worker_gives_way
        else None
    )
    threads, solo = (
        (1, settings.accurate_all_threads) if give_way else (settings.accurate_threads or 1, 0)
    )
    accurate = await _load(settings.accurate_model, settings, ThreadPlan(threads, Spin.NEVER, solo))
    # One lane: its batch's images prepared side by side, then run on every core while the
    # fast model is idle, or on one beside it.
    config = replace(
        config_from(settings),
        nice=EMBEDDED_WORKER_NICE,
        lanes=1,
        prepare_threads=settings.accurate_all_threads,
    )
    worker = Worker(running.store, accurate, config, give_way)
    await running.store.beat(worker.id, accurate.name)
    task = asyncio.create_task(worker.run(running.worker_stop), name="tandem-worker")
    task.add_done_callback(functools.partial(_report_worker_failure, service))
    return task


def _report_worker_failure(service: TandemService, task: asyncio.Task[None]) -> None:
    """Said when it happens, not at shutdown. The proxy goes on answering and queueing, and
    /health fails, so that a supervisor restarts the process and the jobs run."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("the embedded worker stopped on an error; jobs wait for a restart", exc_info=exc)
        service.worker_failure = ServiceUnavailable("the embedded worker stopped", cause=repr(exc))


async def _flush_stats_forever(service: TandemService) -> None:
    while True:
        await asyncio.sleep(STATS_FLUSH_S)
        try:
            await service.flush_stats()
        except QueueUnavailable:  # kept in memory for the next flush
            continue
        except Exception:  # nobody awaits this task: said here, and the next flush tries again
            log.exception("writing the request counts to the store failed")


async def _shutdown(running: _Running) -> None:
    await stop(running.flusher)
    if running.service is not None:
        with contextlib.suppress(QueueUnavailable):
            await running.service.flush_stats()
    running.worker_stop.set()
    if running.worker_task is not None:
        # A worker that failed was reported then; the rest must still shut down.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(running.worker_task, WORKER_STOP_S)
    if running.service is not None:
        await running.service.close()
    await running.store.close()


INFERENCE_PATHS = ("/predict", "/predict/test")


def _add_guards(app: FastAPI, settings: Settings) -> None:
    # Starlette wraps each added middleware around the previous ones: the last is outermost.
    app.add_middleware(Deadline, seconds=settings.request_timeout_s)
    app.add_middleware(
        LoadShedder,
        limit=settings.max_in_flight,
        retry_after_s=settings.retry_after_s,
        paths=INFERENCE_PATHS,
        per_key=settings.max_in_flight_per_key,
    )
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.receive_timeout_s,
        min_rate_bytes_s=settings.receive_min_rate_kib_s * 1024,
        held_max_bytes=settings.max_bodies_bytes,
        per_key_bytes=settings.max_bodies_per_key_bytes,
        retry_after_s=settings.retry_after_s,
    )
    if settings.api_keys:  # outside LoadShedder: it shares places out by key
        app.add_middleware(ApiKeys, keys=parse_keys(settings.api_keys))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "X-API-Key",
                "Content-Type",
                "Idempotency-Key",
                "X-Request-ID",
            ],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(AccessMiddleware, metrics=app.state.metrics, routes=router.routes)
    app.add_middleware(RequestIdMiddleware)


def begin_shutdown(app: FastAPI) -> None:
    """The server has stopped accepting connections: streams and long-polls end now (see
    TandemService.drain), not when the server's graceful wait runs out. Before the lifespan
    has started a service, there are none."""
    service: TandemService | None = getattr(app.state, "service", None)
    if service is not None:
        service.drain()


def create_app(settings: Settings, *, store: JobStore | None = None) -> FastAPI:
    """Build the ASGI app. `store` replaces the one the settings describe (tests)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = _Running(store=store or make_store(settings))
        try:
            app.state.service = await _startup(settings, running)
            with heap.serving():
                yield
        finally:
            await _shutdown(running)

    # Swagger UI's files served from here (fastapi-offline mounts them): FastAPI's /docs takes
    # them from a CDN, which a server on a private network, or a browser offline, does not
    # reach. The /docs page is ours (see api/page.py), for its headers. No /redoc: its page
    # still fetches a logo from its CDN.
    app = FastAPIOffline(
        title="Tandem",
        version=__version__,
        summary="A fast answer now, an accurate answer later.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        telemetry={"exclude": tracing.untraced},  # where an SDK is configured
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    # Added first, so innermost: the guards, the access log and the metrics see HEAD as sent.
    app.add_middleware(HeadAsGet)
    # Innermost but for it: POST /predict meets every guard before DirectRoute serves it.
    app.add_middleware(DirectRoute, route=route_of(predict), handlers=app.exception_handlers)
    _add_guards(app, settings)
    if settings.root_path:  # outermost: the guards, the log and the routes see one path
        app.add_middleware(PassedOnPrefix)
    install_error_handlers(app, [*app.router.routes, *router.routes])
    app.include_router(router)
    if settings.api_keys:
        _document_api_keys(app)
    return app


# How a client sends its key, as ApiKeys takes it; Swagger UI's "Authorize" offers both.
KEY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def _document_api_keys(app: FastAPI) -> None:
    """Say in the schema that every operation but the open ones needs a key, either way."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # FastAPI keeps it as app.openapi_schema: changed in place
        schema.setdefault("components", {})["securitySchemes"] = KEY_SCHEMES
        schema["security"] = [{name: []} for name in KEY_SCHEMES]
        for path in OPEN_PATHS:
            for operation in schema["paths"].get(path, {}).values():
                operation["security"] = []
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
