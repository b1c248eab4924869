"""The HTTP routes: the original's API, kept compatible, with richer fields."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from tandem import __version__, tracing
from tandem.api.bodies import JSON, REQUEST_BODY, image_bytes
from tandem.api.errors import error_body, error_headers, reported
from tandem.api.guards import api_key_id_of, shows_causes
from tandem.api.metrics import CONTENT_TYPE, annotate_access
from tandem.api.middleware import request_id_of
from tandem.api.page import ICON_PATH, docs_page, page_icon, web_page
from tandem.api.params import idempotency_key, once_each, openapi_parameters, query_params
from tandem.api.schemas import (
    ErrorBody,
    GateParams,
    JobResponse,
    PredictParams,
    PredictResponse,
    StatsResponse,
)
from tandem.cascade import Gate
from tandem.jobs.records import Job, JobStatus
from tandem.runtime.assets import sample_image_bytes
from tandem.service import OK, TandemService

router = APIRouter()

MAX_WAIT_S = 60.0
KEEPALIVE_S = 15.0
# Every route can meet the guards (401, 413, 504) and a bug (500); each documents its own too.
_GUARDED = (401, 413, 500, 504)


def _error_bodies(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in (*_GUARDED, *statuses)}


# A job's routes read the store, which may be out of reach (503).
_ERRORS = _error_bodies(404, 405, 409, 422, 503)
_WATCH_ERRORS = _ERRORS | {
    429: {
        "model": ErrorBody,
        "description": "This client (API key) has its share of the streams and long-polls "
        "open (`too_many_requests`).",
    },
}


def _fast_answer_or_error(description: str) -> dict[str, Any]:
    """A status /predict answers either with the fast answer and no job (PredictResponse with
    `error`), or with no answer at all (ErrorBody)."""
    either = [
        {"$ref": "#/components/schemas/PredictResponse"},
        {"$ref": "#/components/schemas/ErrorBody"},
    ]
    return {
        "description": description,
        "content": {"application/json": {"schema": {"oneOf": either}}},
    }


_PREDICT_ERRORS = _error_bodies(400, 415, 422) | {
    429: _fast_answer_or_error(
        "This client (API key) holds its share: of the queue (`too_many_queued`: the fast answer "
        "without a job, PredictResponse with `error`), or of the requests being served or "
        "of the request bodies held at once (`too_many_requests`: no answer, ErrorBody)."
    ),
    503: _fast_answer_or_error(
        "Either the fast answer without a job (the queue is full or unavailable: "
        "PredictResponse with `error`), or no answer at all (`overloaded`: ErrorBody)."
    ),
}


def route_of(endpoint: Any) -> APIRoute:
    """The route this module registered for `endpoint`."""
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint)


def service_of(request: Request) -> TandemService:
    service: TandemService = request.app.state.service
    return service


async def _predict(
    request: Request,
    data: bytes,
    gate: Gate,
    key: str | None = None,
    callback_url: str | None = None,
) -> Response:
    service = service_of(request)
    request_id = request_id_of(request)
    outcome = await service.predict(
        data, request_id, key, gate, callback_url, owner=api_key_id_of(request)
    )
    request.app.state.metrics.observe_fast(outcome)
    tracing.describe_fast(outcome)
    job_id = outcome.job.id if outcome.job else None
    # On the request's access line, written once the response is out, not before it.
    annotate_access(
        request,
        f"fast answer {outcome.prediction.label}; "
        + (f"job {job_id} queued" if job_id else "no job"),
        job_id=job_id,
    )
    # Where the client reaches the job: through the reverse proxy's path, if Tandem has one.
    url = f"{request.scope.get('root_path', '')}/job/{job_id}" if job_id else ""
    body = PredictResponse.of(outcome, service.accurate_model, url, request_id)
    # pydantic's serializer, in one step: a tenth of a ms less than model_dump and json.dumps.
    content = body.model_dump_json()
    if outcome.not_queued is None:
        return Response(content, media_type=JSON)
    refusal = outcome.not_queued
    return Response(
        content, status_code=refusal.status, headers=error_headers(refusal), media_type=JSON
    )


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return web_page().response()


@router.get(ICON_PATH, include_in_schema=False)
async def icon() -> Response:
    return page_icon()


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    return docs_page(request.scope.get("root_path", "")).response()


@router.get(
    "/health",
    summary="Liveness: the process answers, and nothing it runs has died (503 if so).",
    response_model=dict[str, str],
    responses={503: {"description": "The embedded worker stopped on an error: restart."}},
)
async def health(request: Request) -> JSONResponse:
    failure = service_of(request).worker_failure
    if failure is not None:
        said = failure.told(with_cause=shows_causes(request))
        return JSONResponse({"health": said}, status_code=503)
    return JSONResponse({"health": OK})


@router.get(
    "/health/all",
    summary="Each model and the queue: ok, or the reason not (503 when any is not ok).",
    description=(
        "Open to all. With API keys on, what failed underneath (a Redis error names its"
        " address) is told only to a caller that sends a key."
    ),
    responses={503: {"description": "Something is not ok; the body says what."}},
)
async def health_all(request: Request) -> JSONResponse:
    report = await service_of(request).health(causes=shows_causes(request))
    status = 200 if all(value == OK for value in report.values()) else 503
    return JSONResponse(report, status_code=status)


@router.get(
    "/metadata",
    summary="What /predict takes and returns, and the models behind it.",
    responses=_error_bodies(),
)
async def metadata(request: Request) -> dict[str, Any]:
    service = service_of(request)
    manifest = service.fast.manifest
    sample = service.sample_prediction
    return {
        "data_type": "str",
        "data_structure": "(1,1)",
        "data_sample": "base64 encoded image file",
        "prediction_type": "float32",
        "prediction_structure": f"(1,{len(manifest.labels)})",
        "prediction_sample": str([round(s.probability, 8) for s in sample.top_k] if sample else []),
        "version": __version__,  # which release this proxy runs, say during a rolling update
        "models": {
            "fast": {
                "name": manifest.name,
                "sha256": manifest.sha256,  # the same model file behind every proxy?
                "input_size": manifest.preprocess.size,
                "layout": manifest.preprocess.layout,
                "classes": len(manifest.labels),
                "source": manifest.source,
            },
            "accurate": {"name": service.accurate_model},
        },
    }


@router.post(
    "/predict",
    summary="The fast model's answer now, and the id of the job for the accurate model.",
    response_model=PredictResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra={
        "requestBody": REQUEST_BODY,
        "parameters": openapi_parameters(PredictParams, idempotent=True),
    },
)
async def predict(request: Request) -> Response:
    params = query_params(request, PredictParams)
    key = idempotency_key(request)
    if params.callback_url is not None:  # checked before any work, so a bad one costs nothing
        request.app.state.settings.webhooks.check(params.callback_url)
    gate = params.gate(service_of(request).gate)
    return await _predict(request, await image_bytes(request), gate, key, params.callback_url)


@router.get(
    "/predict/test",
    summary="Classify the bundled sample photo (a cat), as POST /predict would.",
    response_model=PredictResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra={"parameters": openapi_parameters(GateParams)},
)
async def predict_test(request: Request) -> Response:
    gate = query_params(request, GateParams).gate(service_of(request).gate)
    return await _predict(request, sample_image_bytes(), gate)


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests, inference, queue, job outcomes, model agreement.",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
        **_error_bodies(),
    },
)
async def metrics(request: Request) -> Response:
    body = await request.app.state.metrics.render_for(service_of(request))
    return Response(body, media_type=CONTENT_TYPE)


@router.get(
    "/stats",
    summary="How often the two models agree, by the fast model's confidence; pick a threshold.",
    response_model=StatsResponse,
    responses=_error_bodies(503),
)
async def stats(request: Request) -> StatsResponse:
    return StatsResponse.of(await service_of(request).stats())


@router.get(
    "/job/{job_id}",
    name="get_job",
    summary='The accurate model\'s answer; prediction is "" until the job is done.',
    response_model=JobResponse,
    responses=_WATCH_ERRORS,
)
async def get_job(
    job_id: str,
    request: Request,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            allow_inf_nan=False,
            description="Long-poll: answer as soon as the job is finished, or after this many "
            "seconds (capped just below the request deadline).",
        ),
    ] = 0.0,
) -> JobResponse:
    once_each(request, "wait")
    service = service_of(request)
    if wait > 0:
        deadline_s = request.app.state.settings.request_timeout_s
        timeout_s = min(wait, deadline_s - 1.0)
        return JobResponse.of(await service.wait(job_id, timeout_s, api_key_id_of(request)))
    return JobResponse.of(await service.job(job_id, api_key_id_of(request)))


@router.get(
    "/job/{job_id}/events",
    summary="Server-Sent Events: the job's state now and at each change, until it is finished.",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`event: <status>` with a JobResponse as `data`, per state; "
            f"a `: keep-alive` comment every {KEEPALIVE_S:g} s without one; an error met "
            "once the stream began is its last event, `event: error` with the error body.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **_WATCH_ERRORS,
    },
)
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    stack = contextlib.AsyncExitStack()
    # Watching starts before the first read (and a 404 is raised) before the stream starts.
    following = service_of(request).follow(job_id, KEEPALIVE_S, api_key_id_of(request))
    states = await stack.enter_async_context(following)
    return StreamingResponse(
        _server_sent_events(states, stack, request_id_of(request)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _server_sent_events(
    states: AsyncIterator[Job], stack: contextlib.AsyncExitStack, request_id: str | None
) -> AsyncIterator[bytes]:
    async with stack:  # a client that goes away cancels this; the watch is dropped at once
        try:
            async for frame in _job_frames(states, KEEPALIVE_S):
                yield frame
        except Exception as exc:  # the 200 went out: the error is the stream's last event
            body = json.dumps(error_body(reported(exc), request_id), separators=(",", ":"))
            yield f"event: error\ndata: {body}\n\n".encode()


async def _job_frames(states: AsyncIterator[Job], keepalive_s: float) -> AsyncIterator[bytes]:
    """An event per new state; a comment when the stream has been quiet for about
    `keepalive_s`. Wake-ups come more often than that (on SQLite another process's write
    to the file wakes every watcher), and the one at `keepalive_s` may come a hair early."""
    sent: tuple[JobStatus, float] | None = None
    quiet_since = time.monotonic()
    async for job in states:
        if (job.status, job.updated_at) != sent:
            sent = (job.status, job.updated_at)
            data = JobResponse.of(job).model_dump_json()
            yield f"event: {job.status}\ndata: {data}\n\n".encode()
        elif time.monotonic() - quiet_since >= 0.9 * keepalive_s:
            yield b": keep-alive\n\n"
        else:
            continue
        quiet_since = time.monotonic()


@router.delete(
    "/job/{job_id}",
    summary="Cancel a job: at once if queued; a running one finishes, marked cancelled.",
    response_model=JobResponse,
    responses=_ERRORS,
)
async def cancel_job(job_id: str, request: Request) -> JobResponse:
    return JobResponse.of(await service_of(request).cancel(job_id, api_key_id_of(request)))
