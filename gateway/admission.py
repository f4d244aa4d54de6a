"""Admission: turn a checked request into a job spec and hand it to the relay.

Both API dialects and the native job API come through here, so priorities, limits,
deadlines and model routing are decided in one place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from corral.errors import Forbidden, MemoryFull, ModelNotFound, RateLimited
from corral.gateway import degrade, inputs
from corral.gateway.audit import note_job
from corral.gateway.auth import Principal, principal_of
from corral.gateway.dialect import Dialect
from corral.gateway.relay import JobResponse
from corral.gateway.state import GatewayState, state_of
from corral.jobs import JobSpec
from corral.keys import JobKind
from corral.ratelimit import WINDOW_MS, Decision, Ticket
from corral.tenants import OPEN_CLASS

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Incoming:
    """An authenticated request body, with its caller."""

    state: GatewayState
    body: dict[str, Any]
    principal: Principal


async def read_request(request: Request) -> Incoming:
    """Read the JSON body of a request whose caller its route has already checked (no body
    is read for a bad key: ``corral.gateway.auth``)."""
    state = state_of(request)
    body = await inputs.read_json(
        request, state.settings.max_body_bytes, state.settings.body_timeout
    )
    return Incoming(state, body, principal_of(request))


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
    key, klass = incoming.principal.key, incoming.principal.klass
    default = key.priority if key.priority is not None else settings.default_priority
    asked = priority if priority is not None else inputs.priority(request, default)
    prio = max(asked, klass.priority_ceiling)  # never more urgent than the class may be
    limit = (
        time_limit if time_limit is not None else _header_timeout(request, settings.request_timeout)
    )
    run_for = (
        run_limit
        if run_limit is not None
        else inputs.run_timeout(request, settings.run_timeout, settings.run_timeout_max)
    )
    if klass.models and model not in klass.models:  # before the fleet's models: no leak
        raise Forbidden(f'model "{body["model"]}" is not allowed for this API key')
    view = state.fleet
    if view.memory_full:  # read by the fleet refresh, not per request
        raise MemoryFull(
            f"server storage nearly full (Redis at {view.memory_share:.0%} of its maxmemory): "
            "new work is refused until running jobs finish, please try again later"
        )
    if not await view.has_model(model):
        raise ModelNotFound(str(body["model"]))
    body["model"] = model
    if klass is not OPEN_CLASS:  # Corral open, or a key without a class: nothing to apply
        await _apply_class(request, state, incoming.principal, kind, body)
    degraded = ""
    if view.level:  # level 0 (normal) costs one attribute read
        degrade.shed(view.load, prio, settings)
        model, degraded = degrade.degrade(
            body, kind, model, prio, view.load, settings, view.current
        )
    degrade.admit(view.load, model, prio, limit, settings)
    if kind.streams:
        body["stream"] = True  # workers always stream from Ollama; ``stream`` is the client's wish
    spec = JobSpec(
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
        owner=key.id,
        priority_asked=asked,
        tenant=key.id,
        quota=(klass.quota_bytes or settings.tenant_quota_bytes) if key.id else 0,
    )
    note_job(request, spec)
    return spec


async def _apply_class(
    request: Request,
    state: GatewayState,
    principal: Principal,
    kind: JobKind,
    body: dict[str, Any],
) -> None:
    """The class's ``num_predict`` ceiling and rate limits."""
    klass = principal.klass
    tokens = 0
    if kind.streams:
        options = body.get("options")
        if not isinstance(options, dict):
            options = body["options"] = {}
        asked = options.get("num_predict")
        limit = klass.num_predict_max
        if limit and (not isinstance(asked, int) or asked < 0 or asked > limit):
            options["num_predict"] = asked = limit  # -1 (no end) and -2 (fill) included
        tokens = (
            asked if isinstance(asked, int) and asked > 0 else state.settings.token_charge_default
        )
    if not klass.rate_limited:
        return
    decision = await state.limiter.charge(principal.key, klass, tokens)
    if decision is None:
        return
    headers = rate_headers(decision)
    if not decision.allowed:
        if decision.retry_after < 0:
            raise RateLimited(
                f"this request's {tokens} tokens exceed a tokens-per-minute limit of its API key"
                " (ask for fewer with num_predict)",
                headers=headers,
            )
        headers["retry-after"] = str(max(1, math.ceil(decision.retry_after)))
        raise RateLimited("rate limit exceeded for this API key, try again later", headers=headers)
    request.state.rate_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
    if decision.ticket is not None:
        request.state.rate_ticket = decision.ticket


def rate_headers(decision: Decision) -> dict[str, str]:
    """The IETF draft's ``RateLimit-*`` fields for the tightest limit."""
    return {
        "ratelimit-limit": str(decision.limit),
        "ratelimit-remaining": str(decision.remaining),
        "ratelimit-reset": str(max(0, math.ceil(decision.reset))),
        "ratelimit-policy": f"{decision.limit};w={WINDOW_MS // 1000}",
    }


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
    level = state.fleet.level
    cache = state.cache if body is not None and spec.kind.streams else None
    response: Response
    if cache is not None and body is not None and cache.takes(request, spec, body, level=level):
        response = await cache.answer(spec, dialect, body, wait=wait, level=level)
    else:
        response = await JobResponse.submit(
            spec,
            state.store,
            state.router,
            dialect,
            max_queue=state.settings.max_queue,
            wait_limit=wait,
            recorder=state.recorder,
        )
        if cache is not None:
            cache.bypassed(response)
    ticket: Ticket | None = getattr(request.state, "rate_ticket", None)
    if ticket is not None and isinstance(response, JobResponse):
        response.on_done = _settler(state, ticket)
    return response


def _settler(state: GatewayState, ticket: Ticket) -> Callable[[bytes], Awaitable[None]]:
    """Give back the tokens a generation was charged and did not generate."""

    async def settle(final: bytes) -> None:
        try:
            answer = orjson.loads(final)
        except orjson.JSONDecodeError:
            return
        used = answer.get("eval_count") if isinstance(answer, dict) else None
        if not isinstance(used, int):
            return  # no count to settle with: the charge stands
        try:
            await state.limiter.settle(ticket, used)
        except (RedisError, OSError) as exc:  # the answer is out: only the refund is lost
            log.warning("settling a token charge failed: %s", exc)

    return settle
