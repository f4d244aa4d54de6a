"""The gateway's front door dispatches fixed paths itself and maps errors like Starlette."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from corral.errors import BadRequest, RequestError
from corral.gateway.app import _internal_error, _request_error
from corral.gateway.routing import FrontDoor


async def ok(request: Request) -> Response:
    return Response(f"ok {request.app.state.name}")


async def bad(request: Request) -> Response:
    raise BadRequest("bad thing")


async def broken(request: Request) -> Response:
    raise ValueError("a bug")


async def item(request: Request) -> Response:
    return Response(f"item {request.path_params['id']}")


def front() -> FrontDoor:
    routes = [
        Route("/ok", ok, methods=["GET"]),
        Route("/v1/bad", bad, methods=["POST"]),
        Route("/broken", broken, methods=["GET"]),
        Route("/items/{id}", item, methods=["GET"]),
    ]
    handlers = {RequestError: _request_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]
    app.state.name = "corral"
    return FrontDoor(app, routes, handlers)  # type: ignore[arg-type]


async def test_front_door_matches_starlette_routing_and_error_mapping() -> None:
    door = front()
    assert set(door.fixed) >= {("GET", "/ok"), ("HEAD", "/ok"), ("POST", "/v1/bad")}
    transport = httpx.ASGITransport(app=door, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as http:
        assert (await http.get("/ok")).text == "ok corral"
        bad_reply = await http.post("/v1/bad")
        assert bad_reply.status_code == 400
        assert bad_reply.json()["error"]["message"] == "bad thing"  # OpenAI shape under /v1
        broken_reply = await http.get("/broken")
        assert broken_reply.status_code == 500
        assert broken_reply.json() == {"error": "internal server error"}
        assert (await http.get("/items/7")).text == "item 7"  # via Starlette's router
        assert (await http.post("/ok")).status_code == 405
        assert (await http.get("/nowhere")).status_code == 404
