"""Where domain errors become HTTP responses: one JSON shape for every error."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from tandem.api.middleware import GET_WITH_EFFECTS, request_id_of
from tandem.api.paths import route_path
from tandem.errors import (
    InvalidJSON,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ReceiveTimeout,
    TandemError,
    Unauthorized,
    ValidationFailed,
)

log = logging.getLogger("tandem.api")

ExceptionHandler = Callable[[Request, Exception], Awaitable[JSONResponse]]


def error_body(error: TandemError, request_id: str | None) -> dict[str, Any]:
    """The one error shape, in a response body or a stream's last event."""
    body = {
        "code": error.code,
        "message": error.message,
        "request_id": request_id,
        "details": error.details,
    }
    return {"error": body}


def error_json(error: TandemError, request_id: str | None) -> JSONResponse:
    """An error response; middlewares that answer before routing use it too."""
    body = error_body(error, request_id)
    return JSONResponse(body, status_code=error.status, headers=error_headers(error))


def error_headers(error: TandemError) -> dict[str, str]:
    """What an error tells a client in headers: when to retry, how to authenticate."""
    headers = {}
    if (retry_after := error.details.get("retry_after")) is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="tandem"'
    if isinstance(error, ReceiveTimeout):  # what is left of the request would be read as the next
        headers["Connection"] = "close"
    return headers


def error_response(request: Request, error: TandemError) -> JSONResponse:
    return error_json(error, request_id_of(request))


def reported(exc: Exception) -> TandemError:
    """What a client is told of `exc`, logged for the operator: a domain error as it is, the
    unexpected as an internal error, with its traceback in the log."""
    if not isinstance(exc, TandemError):
        log.exception("unhandled error", exc_info=exc)
        return TandemError("internal error; see the server log")
    if exc.status >= 500:
        log.warning("%s: %s", exc.code, exc)
    return exc


async def _reported(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, reported(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type")}
        for e in exc.errors()
    ]
    if any(p["type"] == "json_invalid" for p in problems):
        return error_response(request, InvalidJSON("the request body is not valid JSON"))
    # A problem with the body as a whole (a JSON array, say) has no location of its own.
    summary = "; ".join(f"{'.'.join(p['loc']) or 'body'}: {p['msg']}" for p in problems)
    return error_response(request, ValidationFailed(summary, problems=problems))


def _http_error(routes: Sequence[BaseRoute]) -> ExceptionHandler:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        error: TandemError
        if exc.status_code == 404:
            error = NotFound("no such route")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed here")
        else:
            error = InvalidRequest(str(exc.detail), http_status=exc.status_code)
        response = error_response(request, error)
        # Keep what the framework says about the failure, such as 405's required Allow header,
        # which must name the methods of every route on this path, not only the first one's.
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(sorted(_methods_on_path(request, routes)))
        return response

    return handle


def _methods_on_path(request: Request, routes: Sequence[BaseRoute]) -> set[str]:
    methods: set[str] = set()
    for route in routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    if "GET" in methods and route_path(request.scope) not in GET_WITH_EFFECTS:  # see HeadAsGet
        methods.add("HEAD")
    return methods


def install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    """`routes`: every route one by one, for the Allow header of a 405 (FastAPI holds an
    included router's routes behind one entry of its own)."""
    app.add_exception_handler(TandemError, _reported)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error(routes))
    app.add_exception_handler(Exception, _reported)
