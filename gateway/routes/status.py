"""The fleet at a glance: ``GET /status`` (an HTML page) and ``GET /metrics`` (Prometheus).

Both read one snapshot of the whole fleet from Redis (``corral.snapshot``), so any
gateway process answers for every node, queue and counter. When keys are configured,
``/metrics`` needs the ``metrics`` scope and ``/status`` the ``admin`` scope.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from corral.gateway import cache_metrics, status_page
from corral.gateway import metrics as fleet_metrics
from corral.gateway.auth import route
from corral.gateway.state import GatewayState, state_of
from corral.snapshot import Snapshot, take_snapshot
from corral.tenants import Scope


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
    # Rendering is synchronous and cheap: the Redis reads are all in the snapshot.
    body = fleet_metrics.render(
        snapshot, gateway_id=state.gateway_id, waiting=len(state.router.waiters)
    )
    if state.cache is not None:
        body += await cache_metrics.render(state.cache.store, state.gateway_id)
    return Response(body, media_type=fleet_metrics.CONTENT_TYPE)


async def status(request: Request) -> Response:
    state = state_of(request)
    page = status_page.render(
        await _snapshot(state), gateway_id=state.gateway_id, waiting=len(state.router.waiters)
    )
    return HTMLResponse(page, headers={"cache-control": "no-store"})


ROUTES = [
    route("/metrics", metrics, methods=["GET"], scope=Scope.METRICS),
    route("/status", status, methods=["GET"], scope=Scope.ADMIN),
]
