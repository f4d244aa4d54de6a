"""What the gateway's routes share, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.requests import Request

from corral.gateway.fleetview import FleetView
from corral.gateway.replies import ReplyRouter
from corral.jobs import JobStore
from corral.loops import LoopHealth
from corral.settings import GatewaySettings
from corral.telemetry import Recorder


@dataclass(slots=True)
class GatewayState:
    settings: GatewaySettings
    gateway_id: str
    redis: Redis
    store: JobStore
    router: ReplyRouter
    fleet: FleetView
    health: LoopHealth
    """Each background loop's last success, for /healthz."""
    recorder: Recorder
    """This process's latency and request figures, flushed to Redis in the background."""


def state_of(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.corral
    return state
