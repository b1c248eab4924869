"""Where in the app a request goes, for the guards that pick requests by path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path below the app's root path: uvicorn puts TANDEM_ROOT_PATH in front
    of the path that a reverse proxy passed on, as ASGI asks, and the router takes it off
    again, as this does (Starlette's rule, which it keeps private)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path
