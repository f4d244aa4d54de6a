"""What the gateway's routes share, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from starlette.requests import Request

from corral.gateway.fleetview import FleetView
from corral.gateway.replies import ReplyRouter
from corral.jobs import JobStore
from corral.loops import LoopHealth
from corral.settings import GatewaySettings
from corral.telemetry import Recorder

if TYPE_CHECKING:
    from corral.gateway.audit import AuditLog
    from corral.gateway.auth import Authenticator
    from corral.gateway.cache import ResponseCache
    from corral.ratelimit import RateLimiter


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
    cache: ResponseCache | None = None
    """The shared response cache (None when CORRAL_CACHE is off)."""
    auth: Authenticator = None  # type: ignore[assignment]
    """Who may call what (``corral.gateway.auth``); set in the lifespan."""
    limiter: RateLimiter = None  # type: ignore[assignment]
    audit: AuditLog | None = None
    """The audit log (None when CORRAL_AUDIT_LOG is empty)."""


def state_of(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.corral
    return state
