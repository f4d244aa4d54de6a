"""Corral's own API: submit a job and fetch it later, cancel it, health and nodes."""

from __future__ import annotations

from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from corral import keys
from corral.connections import text
from corral.errors import BadRequest, NotFound, RequestError
from corral.gateway import inputs
from corral.gateway.admission import Incoming, make_spec, read_request, relay
from corral.gateway.routes.ollama import json_response
from corral.gateway.state import state_of
from corral.keys import FINAL_STATES, JobKind, JobState


class JobDialect:
    """``POST /jobs`` with ``wait: true`` answers the job view, not the bare Ollama object."""

    stream_media_type = "application/json"

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id.encode()

    def single(self, payload: bytes) -> bytes:
        return b'{"id":"%s","state":"done","result":%s}' % (self.job_id, payload)

    def error_body(self, message: str, status: int) -> bytes:
        state = "cancelled" if status == 499 else "expired" if status == 408 else "failed"
        view = {"id": self.job_id.decode(), "state": state, "error": message, "status": status}
        return orjson.dumps(view)

    chunk = last = single  # never streamed

    def stream_error(self, message: str, status: int) -> bytes:
        return self.error_body(message, status)


async def submit(request: Request) -> Response:
    """``{"kind", "request", "priority"?, "wait"?, "timeout"?, "run_timeout"?}``; the request
    is an Ollama body."""
    incoming = await read_request(request)
    body = incoming.body
    kind = _kind(body.get("kind"))
    job_body = body.get("request")
    if not isinstance(job_body, dict):
        raise BadRequest("'request' must be the Ollama request body (a JSON object)")
    wait = body.get("wait", True)
    if not isinstance(wait, bool):
        raise BadRequest("'wait' must be a boolean")
    prio = body.get("priority")
    if prio is not None and (
        isinstance(prio, bool) or not isinstance(prio, int) or not 0 <= prio <= 9
    ):
        raise BadRequest("'priority' must be an integer from 0 to 9")
    timeout = body.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise BadRequest("'timeout' must be a number of seconds above 0")
    run_timeout = body.get("run_timeout")
    if run_timeout is not None:
        ceiling = incoming.state.settings.run_timeout_max
        run_timeout = inputs.checked_run_timeout(run_timeout, ceiling, "'run_timeout'")
    job_incoming = Incoming(incoming.state, job_body, incoming.key_priority)
    spec = await make_spec(
        request,
        job_incoming,
        kind,
        stream=False,
        wait=wait,
        priority=prio if prio is not None else None,
        time_limit=float(timeout) if timeout is not None else None,
        run_limit=run_timeout,
    )
    if wait:
        return await relay(request, spec, JobDialect(spec.job_id))
    state = incoming.state
    depth = await state.store.enqueue(spec, max_queue=state.settings.max_queue)
    return json_response(
        {"id": spec.job_id, "state": JobState.QUEUED.value, "queued": depth}, status=202
    )


def _kind(value: Any) -> JobKind:
    try:
        return JobKind(value)
    except ValueError:
        choices = ", ".join(k.value for k in JobKind)
        raise BadRequest(f"'kind' must be one of: {choices}") from None


async def get_job(request: Request) -> Response:
    state = state_of(request)
    inputs.api_key_priority(request, state.settings)
    view = await state.store.get(request.path_params["job_id"])
    if view is None:
        raise NotFound("job not found (unknown, or its record expired)")
    return json_response(view)


async def cancel_job(request: Request) -> Response:
    state = state_of(request)
    inputs.api_key_priority(request, state.settings)
    job_id = request.path_params["job_id"]
    prior = await state.store.cancel(job_id, "cancelled through the API")
    if prior is None:
        raise NotFound("job not found (unknown, or its record expired)")
    if prior in FINAL_STATES:
        raise RequestError(f"job already {prior.value}", 409)
    return json_response({"id": job_id, "state": JobState.CANCELLED.value, "was": prior.value})


async def healthz(request: Request) -> Response:
    state = state_of(request)
    try:
        await state.redis.ping()
    except (RedisError, OSError) as exc:
        return json_response({"status": "unavailable", "redis": str(exc)}, status=503)
    fleet = state.fleet.current
    stale = state.health.stale()
    return json_response(
        {
            "status": "stale" if stale else "ok",
            "gateway": state.gateway_id,
            "redis": "ok",
            "loops": state.health.report(),
            "nodes": len(fleet.nodes),
            "models": sorted(fleet.models()),
            "waiting": len(state.router.waiters),
        },
        status=503 if stale else 200,
    )


async def nodes(request: Request) -> Response:
    state = state_of(request)
    inputs.api_key_priority(request, state.settings)
    fleet = await state.fleet.refresh()
    stats = await state.redis.hgetall(keys.STATS)
    return json_response(
        {
            "nodes": fleet.nodes,
            "stats": {text(k): int(v) for k, v in stats.items()},
        }
    )


ROUTES = [
    Route("/jobs", submit, methods=["POST"]),
    Route("/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/jobs/{job_id}", cancel_job, methods=["DELETE"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/nodes", nodes, methods=["GET"]),
]
