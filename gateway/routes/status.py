"""The fleet at a glance: ``GET /status`` (the live dashboard), ``GET /status.json`` (its
figures), ``GET /status/series.json`` (its graphs) and ``GET /metrics`` (Prometheus).

All read the whole fleet from Redis (``corral.snapshot``, ``corral.telemetry``,
``corral.series``), so any gateway process answers for every node, queue and counter.
The dashboard's page, script and style sheet ship inside the package: nothing is
fetched from anywhere else. When keys are configured, ``/metrics`` needs the ``metrics``
scope and the dashboard (page and figures) the ``admin`` scope; its script and style
sheet hold no figures and are public.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from corral import series
from corral.errors import BadRequest
from corral.gateway import cache_metrics
from corral.gateway import metrics as fleet_metrics
from corral.gateway.auth import route
from corral.gateway.routes.ollama import json_response
from corral.gateway.state import GatewayState, state_of
from corral.snapshot import Snapshot, take_snapshot
from corral.telemetry import RETENTION, read_metrics
from corral.tenants import Scope

ASSET_TYPES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
NO_STORE = {"cache-control": "no-store"}


@functools.cache
def asset(name: str) -> bytes:
    """One file of the dashboard, read from the package once (when first asked for)."""
    return (resources.files("corral.gateway") / "static" / name).read_bytes()


async def _snapshot(state: GatewayState) -> Snapshot:
    settings = state.settings
    return await take_snapshot(
        state.redis,
        settings.redis_url,
        node_ttl=settings.node_ttl,
        gateway_ttl=settings.gateway_ttl,
    )


async def metrics(request: Request) -> Response:
    state = state_of(request)
    snapshot = await _snapshot(state)
    recorded = await read_metrics(state.redis)
    # Rendering is synchronous and cheap: the Redis reads are all done.
    body = fleet_metrics.render(
        snapshot,
        gateway_id=state.gateway_id,
        waiting=len(state.router.waiters),
        recorded=recorded,
    )
    if state.cache is not None:
        body += await cache_metrics.render(state.cache.store, state.gateway_id)
    return Response(body, media_type=fleet_metrics.CONTENT_TYPE)


async def status(request: Request) -> Response:
    return HTMLResponse(asset("dashboard.html"), headers=NO_STORE)


async def status_asset(request: Request) -> Response:
    name = request.url.path.rsplit("/", 1)[-1]
    return Response(asset(name), media_type=ASSET_TYPES[name], headers=NO_STORE)


async def status_json(request: Request) -> Response:
    """The snapshot the dashboard draws its tables from, with this gateway's figures."""
    state = state_of(request)
    snapshot = await _snapshot(state)
    body = {
        **asdict(snapshot),
        "gateway": state.gateway_id,
        "waiting": len(state.router.waiters),
        "node_ttl": state.settings.node_ttl,
        "level": snapshot.load.level,
    }
    response = json_response(body)
    response.headers.update(NO_STORE)
    return response


async def series_json(request: Request) -> Response:
    """``?resolution=1|10&span=SECONDS``: every graph's lines over the last ``span``."""
    state = state_of(request)
    try:
        resolution = int(request.query_params.get("resolution", "1"))
        span = float(request.query_params.get("span", "300"))
    except ValueError as exc:
        raise BadRequest("resolution and span must be numbers") from exc
    if resolution not in RETENTION:
        raise BadRequest(f"resolution must be one of {sorted(RETENTION)} (seconds)")
    if not 0 < span <= RETENTION[resolution]:
        raise BadRequest(f"span must be between 0 and {RETENTION[resolution]} seconds")
    response = json_response(await series.read_graphs(state.redis, resolution, span))
    response.headers.update(NO_STORE)
    return response


ROUTES = [
    route("/metrics", metrics, methods=["GET"], scope=Scope.METRICS),
    route("/status", status, methods=["GET"], scope=Scope.ADMIN),
    route("/status.json", status_json, methods=["GET"], scope=Scope.ADMIN),
    route("/status/series.json", series_json, methods=["GET"], scope=Scope.ADMIN),
    *(
        route(f"/status/{name}", status_asset, methods=["GET"], scope=Scope.PUBLIC)
        for name in ASSET_TYPES
    ),
]
