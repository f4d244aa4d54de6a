"""Ollama's API, served from the fleet: same paths, fields, streaming and errors."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from corral import __version__, keys
from corral.errors import BadRequest, Forbidden, ModelNotFound
from corral.gateway.admission import make_spec, read_request, relay
from corral.gateway.auth import route
from corral.gateway.dialect import OLLAMA
from corral.gateway.ollama_schema import BY_KIND, Body, ShowRequest
from corral.gateway.state import state_of
from corral.gateway.validation import check
from corral.keys import JobKind
from corral.names import normalize_model
from corral.tenants import Scope

JSON = "application/json; charset=utf-8"

FALLBACK_VERSION = "0.12.6"
"""Reported when no node has told us its Ollama version yet."""


def json_response(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type=JSON)


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    """The oldest Ollama version in the fleet: what every request can rely on."""
    versions = [
        str(n["version"]) for n in state_of(request).fleet.current.nodes if n.get("version")
    ]
    oldest = min(versions, key=_version_key) if versions else FALLBACK_VERSION
    return json_response({"version": oldest, "corral": __version__})


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(
        int(part) if part.isdigit() else 0 for part in text.split("-", maxsplit=1)[0].split(".")
    )


async def generate(request: Request) -> Response:
    return await _ollama_job(request, JobKind.GENERATE)


async def chat(request: Request) -> Response:
    return await _ollama_job(request, JobKind.CHAT)


async def embed(request: Request) -> Response:
    return await _ollama_job(request, JobKind.EMBED)


async def embeddings(request: Request) -> Response:
    return await _ollama_job(request, JobKind.EMBEDDINGS)


async def _ollama_job(request: Request, kind: JobKind) -> Response:
    incoming = await read_request(request)
    check(BY_KIND[kind], incoming.body)
    stream = kind.streams and incoming.body.get("stream", True) is not False
    spec = await make_spec(request, incoming, kind, stream=stream)
    return await relay(request, spec, OLLAMA, body=incoming.body)


async def tags(request: Request) -> Response:
    models = state_of(request).fleet.current.models()
    return json_response({"models": sorted(models.values(), key=lambda m: str(m.get("name")))})


async def ps(request: Request) -> Response:
    return json_response({"models": state_of(request).fleet.current.loaded()})


async def show(request: Request) -> Response:
    incoming = await read_request(request)
    body = check(ShowRequest, incoming.body)
    name = body.model or body.name
    if not name:
        raise BadRequest("model is required")
    model = normalize_model(name)
    state = incoming.state
    info = (
        await state.redis.get(keys.model_info(model))
        if await state.fleet.has_model(model)
        else None
    )
    if info is None:
        raise ModelNotFound(name)
    return Response(info, media_type=JSON)


async def management(request: Request) -> Response:
    raise Forbidden(
        f"{request.url.path} is not available through Corral: manage models on each node's "
        "Ollama directly (Corral picks up the change within a refresh)"
    )


ROUTES = [
    route("/", root, methods=["GET", "HEAD"], scope=Scope.PUBLIC),
    route("/api/version", version, methods=["GET"], scope=Scope.PUBLIC),
    route("/api/generate", generate, methods=["POST"], scope=Scope.USER),
    route("/api/chat", chat, methods=["POST"], scope=Scope.USER),
    route("/api/embed", embed, methods=["POST"], scope=Scope.USER),
    route("/api/embeddings", embeddings, methods=["POST"], scope=Scope.USER),
    route("/api/tags", tags, methods=["GET"], scope=Scope.USER),
    route("/api/ps", ps, methods=["GET"], scope=Scope.USER),
    route("/api/show", show, methods=["POST"], scope=Scope.USER),
    *(
        route(path, management, methods=["POST", "DELETE", "HEAD"], scope=Scope.USER)
        for path in ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete")
    ),
    route("/api/blobs/{digest}", management, methods=["POST", "HEAD"], scope=Scope.USER),
]

BODIES: dict[str, type[Body]] = {
    **{kind.path: BY_KIND[kind] for kind in JobKind},
    "/api/show": ShowRequest,
}
"""The declared body of each route that takes one (published by ``GET /openapi.json``)."""
