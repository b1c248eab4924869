"""DirectRoute: a route served ahead of FastAPI's layers still behaves as FastAPI serves it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient

from tandem.api.direct import DirectRoute
from tandem.api.errors import install_error_handlers
from tandem.errors import InvalidRequest


def _app() -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    served: list[str] = []

    @app.post("/hot")
    async def hot(request: Request) -> Response:
        served.append(getattr(request.scope.get("route"), "path", ""))
        match request.query_params.get("fail"):
            case "domain":
                raise InvalidRequest("bad parameter")
            case "bug":
                raise RuntimeError("a bug")
        return JSONResponse({"ok": True})

    @app.get("/hot")
    async def hot_get() -> dict[str, str]:
        return {"via": "fastapi"}

    install_error_handlers(app, app.router.routes)
    route = next(r for r in app.router.routes if getattr(r, "endpoint", None) is hot)
    app.add_middleware(DirectRoute, route=route, handlers=app.exception_handlers)
    return app, served


def test_the_route_answers_and_sees_itself_as_the_matched_route() -> None:
    app, served = _app()
    with TestClient(app) as client:
        assert client.post("/hot").json() == {"ok": True}
    assert served == ["/hot"]


def test_other_methods_and_paths_go_to_fastapi() -> None:
    app, served = _app()
    with TestClient(app) as client:
        assert client.get("/hot").json() == {"via": "fastapi"}
        assert client.post("/elsewhere").status_code == 404
    assert served == []


def test_errors_take_the_apps_handlers_and_shape() -> None:
    app, _ = _app()
    with TestClient(app, raise_server_exceptions=False) as client:
        domain = client.post("/hot", params={"fail": "domain"})
        bug = client.post("/hot", params={"fail": "bug"})
    assert domain.status_code == 400
    assert domain.json()["error"]["code"] == "invalid_request"
    assert bug.status_code == 500
    assert bug.json()["error"]["message"] == "internal error; see the server log"
