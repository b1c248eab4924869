"""Where in the app a request goes, for the guards that pick requests by path; and a request
whose proxy left the root path in front of it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path below the app's root path: uvicorn puts TANDEM_ROOT_PATH in front
    of the path that a reverse proxy passed on, as ASGI asks, and the router takes it off
    again, as this does (Starlette's rule, which it keeps private)."""
    path: str = scope["path"]
    below = _below(path, scope.get("root_path", ""))
    return path if below is None else below


def _below(path: str, prefix: str) -> str | None:
    """`path` without `prefix`, where it begins with it as whole segments."""
    if prefix and path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] in ("", "/"):
        return path[len(prefix) :]
    return None


class PassedOnPrefix:
    """A request whose proxy passed the root path on (nginx's `proxy_pass` without a URI,
    Traefik without StripPrefix) is served as if the proxy had stripped it. uvicorn puts the
    root path in front of the path as sent, which then held it twice, and every route
    answered 404. A route under the root path twice over is not one of Tandem's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            _root_path_once(scope)
        await self.app(scope, receive, send)


def _root_path_once(scope: Scope) -> None:
    root: str = scope.get("root_path", "")
    if not root or _below(scope["path"], root + root) is None:
        return
    scope["path"] = scope["path"][len(root) :]
    raw: bytes | None = scope.get("raw_path")
    if raw is not None and raw.startswith((root + root).encode()):
        scope["raw_path"] = raw[len(root) :]
