"""One hot route served without FastAPI's per-request layers.

Between Tandem's guards and an endpoint, FastAPI 0.165 runs an exception middleware, an exit
stack, a body-limit and a telemetry middleware, and its router: about 0.3 ms of CPU a request,
which on the sync path lands beside a 10 ms model. `DirectRoute` calls the endpoint itself,
innermost of the guards, and turns its exceptions into responses through the app's own
handlers, so errors keep their one shape. The route stays registered with FastAPI, which
documents it at /docs and in the OpenAPI schema, and FastAPI's OpenTelemetry is told the
route it matched, as its router would tell it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tandem.api.paths import route_path

try:  # FastAPI's router names the matched route to its telemetry with this
    from fastapi.telemetry._api import _route_selected
except ImportError:  # a FastAPI without telemetry: nothing to tell

    def _route_selected(
        *, scope: MutableMapping[str, Any], path: str | None, mount: bool = False
    ) -> None:
        pass


Endpoint = Callable[[Request], Awaitable[Response]]
# As Starlette keeps them: by exception class or status code, sync or async.
Handlers = Mapping[Any, Callable[[Request, Any], Response | Awaitable[Response]]]


class DirectRoute:
    """Serves `route` itself; its endpoint must take the Request alone (nothing is solved).
    Anything else goes on to FastAPI. The route is matched below the root path, as the
    router matches it."""

    def __init__(
        self,
        app: ASGIApp,
        route: APIRoute,
        handlers: Handlers,
    ) -> None:
        self.app = app
        self.route = route
        self.methods = route.methods or set()
        self.endpoint: Endpoint = route.endpoint
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.route
        if (
            scope["type"] != "http"
            or route_path(scope) != route.path
            or scope["method"] not in self.methods
        ):
            await self.app(scope, receive, send)
            return
        # As the router would: /metrics, and FastAPI's spans and metrics, label by route.
        scope["route"] = route
        _route_selected(scope=scope, path=route.path)
        request = Request(scope, receive, send)
        try:
            response = await self.endpoint(request)
        except Exception as exc:
            response = await self._handled(request, exc)
        await response(scope, receive, send)

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The response the app's handler for `exc`'s class (or nearest base) gives."""
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                response = self.handlers[cls](request, exc)
                return await response if inspect.isawaitable(response) else response
        raise exc
