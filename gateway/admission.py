"""Admission: turn a checked request into a job spec and hand it to the relay.

Both API dialects and the native job API come through here, so priorities, limits,
deadlines and model routing are decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from corral.errors import MemoryFull, ModelNotFound
from corral.gateway import degrade, inputs
from corral.gateway.dialect import Dialect
from corral.gateway.relay import JobResponse
from corral.gateway.state import GatewayState, state_of
from corral.jobs import JobSpec
from corral.keys import JobKind


@dataclass(slots=True)
class Incoming:
    """An authenticated request body, with the caller's default priority."""

    state: GatewayState
    body: dict[str, Any]
    key_priority: int | None
    tenant: str = ""
    """Who the job's stored bytes are charged to ('' without API keys)."""


async def read_request(request: Request) -> Incoming:
    """Authenticate first (no body is read for a bad key), then read the JSON body."""
    state = state_of(request)
    key_priority = inputs.api_key_priority(request, state.settings)
    tenant = inputs.tenant(request, state.settings)
    body = await inputs.read_json(
        request, state.settings.max_body_bytes, state.settings.body_timeout
    )
    return Incoming(state, body, key_priority, tenant)


async def make_spec(
    request: Request,
    incoming: Incoming,
    kind: JobKind,
    *,
    stream: bool,
    wait: bool = True,
    priority: int | None = None,
    time_limit: float | None = None,
    run_limit: float | None = None,
) -> JobSpec:
    """Resolve the model of a checked body of ``kind`` and build the job (nothing enqueued).

    Each route checks its body against its declared model first
    (``corral.gateway.validation``); the OpenAI routes pass their translation."""
    state, body = incoming.state, incoming.body
    settings = state.settings
    model = inputs.model_name(body)
    default = (
        incoming.key_priority if incoming.key_priority is not None else settings.default_priority
    )
    prio = priority if priority is not None else inputs.priority(request, default)
    limit = (
        time_limit if time_limit is not None else _header_timeout(request, settings.request_timeout)
    )
    run_for = (
        run_limit
        if run_limit is not None
        else inputs.run_timeout(request, settings.run_timeout, settings.run_timeout_max)
    )
    view = state.fleet
    if view.memory_full:  # read by the fleet refresh, not per request
        raise MemoryFull(
            f"server storage nearly full (Redis at {view.memory_share:.0%} of its maxmemory): "
            "new work is refused until running jobs finish, please try again later"
        )
    if not await view.has_model(model):
        raise ModelNotFound(str(body["model"]))
    body["model"] = model
    degraded = ""
    if view.level:  # level 0 (normal) costs one attribute read
        degrade.shed(view.load, prio, settings)
        model, degraded = degrade.degrade(
            body, kind, model, prio, view.load, settings, view.current
        )
    degrade.admit(view.load, model, prio, limit, settings)
    if kind.streams:
        body["stream"] = True  # workers always stream from Ollama; ``stream`` is the client's wish
    return JobSpec(
        kind=kind,
        model=model,
        request=orjson.dumps(body),
        priority=prio,
        gateway_id=state.gateway_id,
        stream=stream,
        wait=wait,
        wait_limit=limit or 0.0,
        max_attempts=settings.max_attempts,
        run_timeout=run_for,
        degraded=degraded,
        tenant=incoming.tenant,
        quota=settings.tenant_quota_bytes if incoming.tenant else 0,
    )


def _header_timeout(request: Request, ceiling: float) -> float | None:
    if request.headers.get(inputs.TIMEOUT_HEADER) is None:
        return None
    return inputs.timeout(request, ceiling)


async def relay(
    request: Request, spec: JobSpec, dialect: Dialect, *, body: dict[str, Any] | None = None
) -> Response:
    """Enqueue and return the response that answers the client from the job's replies.

    ``body`` (the checked request, model resolved) makes the answer cacheable: a
    generate or chat request then goes through the shared response cache, which may
    answer it without a job of its own (``corral.gateway.cache``)."""
    state = state_of(request)
    wait = inputs.timeout(request, state.settings.request_timeout)
    if body is not None and state.cache is not None and spec.kind.streams:
        return await state.cache.answer(
            request, spec, dialect, body, wait=wait, level=state.fleet.level
        )
    return await JobResponse.submit(
        spec,
        state.store,
        state.router,
        dialect,
        max_queue=state.settings.max_queue,
        wait_limit=wait,
    )
