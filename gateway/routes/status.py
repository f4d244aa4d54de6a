"""The fleet at a glance: ``GET /status`` (an HTML page) and ``GET /metrics`` (Prometheus).

Both read one snapshot of the whole fleet from Redis (``corral.snapshot``), so any
gateway process answers for every node, queue and counter. Like ``/nodes``, both ask
for an API key when keys are configured.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from corral.gateway import inputs, status_page
from corral.gateway import metrics as fleet_metrics
from corral.gateway.state import GatewayState, state_of
from corral.snapshot import Snapshot, take_snapshot
from corral.telemetry import read_metrics


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
    inputs.api_key_priority(request, state.settings)
    snapshot = await _snapshot(state)
    recorded = await read_metrics(state.redis)
    # Rendering is synchronous and cheap: the Redis reads are all done.
    body = fleet_metrics.render(
        snapshot,
        gateway_id=state.gateway_id,
        waiting=len(state.router.waiters),
        recorded=recorded,
    )
    return Response(body, media_type=fleet_metrics.CONTENT_TYPE)


async def status(request: Request) -> Response:
    state = state_of(request)
    inputs.api_key_priority(request, state.settings)
    page = status_page.render(
        await _snapshot(state), gateway_id=state.gateway_id, waiting=len(state.router.waiters)
    )
    return HTMLResponse(page, headers={"cache-control": "no-store"})


ROUTES = [
    Route("/metrics", metrics, methods=["GET"]),
    Route("/status", status, methods=["GET"]),
]
