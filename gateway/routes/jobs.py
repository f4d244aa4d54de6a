"""Corral's own API: submit a job and fetch it later, cancel it, health, nodes, and the
OpenAPI document of every request body."""

from __future__ import annotations

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from corral import __version__, keys
from corral.connections import text
from corral.errors import NotFound, RequestError
from corral.gateway import inputs
from corral.gateway.admission import Incoming, make_spec, read_request, relay
from corral.gateway.auth import principal_of, route
from corral.gateway.ollama_schema import BY_KIND, Body, JobSubmission
from corral.gateway.openapi import document
from corral.gateway.relay import DEGRADED_HEADER
from corral.gateway.routes import ollama, openai
from corral.gateway.routes.ollama import json_response
from corral.gateway.state import state_of
from corral.gateway.validation import check
from corral.keys import FINAL_STATES, JobState
from corral.tenants import Scope


class JobDialect:
    """``POST /jobs`` with ``wait: true`` answers the job view, not the bare Ollama object."""

    stream_media_type = "application/json"
    name = "jobs"

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
    is an Ollama body of that kind, checked as on its own path."""
    incoming = await read_request(request)
    job = check(JobSubmission, incoming.body)
    job_body = incoming.body["request"]  # forwarded as sent, like any Ollama body
    check(BY_KIND[job.kind], job_body, at="request")
    run_timeout = job.run_timeout
    if run_timeout is not None:
        ceiling = incoming.state.settings.run_timeout_max
        run_timeout = inputs.checked_run_timeout(run_timeout, ceiling, "'run_timeout'")
    job_incoming = Incoming(incoming.state, job_body, incoming.principal)
    spec = await make_spec(
        request,
        job_incoming,
        job.kind,
        stream=False,
        wait=job.wait,
        priority=job.priority,
        time_limit=job.timeout,
        run_limit=run_timeout,
    )
    if job.wait:
        return await relay(request, spec, JobDialect(spec.job_id))
    state = incoming.state
    # The enqueue script charges the request to its key's stored-bytes quota (the job's
    # ``tenant``), or refuses it (429) when that would pass the quota.
    depth = await state.store.enqueue(spec, max_queue=state.settings.max_queue)
    response = json_response(
        {"id": spec.job_id, "state": JobState.QUEUED.value, "queued": depth}, status=202
    )
    if spec.degraded:
        response.headers[DEGRADED_HEADER.decode()] = spec.degraded
    response.headers["x-corral-job-id"] = spec.job_id
    return response


async def openapi(request: Request) -> Response:
    """The request bodies of every API as an OpenAPI 3.1 document (no key needed)."""
    bodies = {**ollama.BODIES, **openai.BODIES, **BODIES}
    return json_response(document(bodies, title="Corral", version=__version__))


async def get_job(request: Request) -> Response:
    state = state_of(request)
    view = await state.store.get(request.path_params["job_id"])
    if view is None or not principal_of(request).owns(view["owner"]):
        raise NotFound(_NOT_FOUND)  # another key's job is as unknown as a missing one
    response = json_response(view)
    response.headers["x-corral-job-id"] = request.path_params["job_id"]
    return response


async def cancel_job(request: Request) -> Response:
    state = state_of(request)
    job_id = request.path_params["job_id"]
    principal = principal_of(request)
    owner = await state.redis.hget(keys.job(job_id), "owner")
    if not principal.owns(text(owner) if owner else ""):
        raise NotFound(_NOT_FOUND)  # another key's job is as unknown as a missing one
    prior = await state.store.cancel(job_id, "cancelled through the API")
    if prior is None:
        raise NotFound(_NOT_FOUND)
    if prior in FINAL_STATES:
        raise RequestError(f"job already {prior.value}", 409)
    response = json_response({"id": job_id, "state": JobState.CANCELLED.value, "was": prior.value})
    response.headers["x-corral-job-id"] = job_id
    return response


_NOT_FOUND = "job not found (unknown, or its record expired)"


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
    fleet = await state.fleet.refresh()
    stats = await state.redis.hgetall(keys.STATS)
    return json_response(
        {
            "nodes": fleet.nodes,
            "stats": {text(k): int(v) for k, v in stats.items()},
        }
    )


ROUTES = [
    route("/jobs", submit, methods=["POST"], scope=Scope.USER),
    route("/jobs/{job_id}", get_job, methods=["GET"], scope=Scope.USER),
    route("/jobs/{job_id}", cancel_job, methods=["DELETE"], scope=Scope.USER),
    route("/healthz", healthz, methods=["GET"], scope=Scope.PUBLIC),
    route("/nodes", nodes, methods=["GET"], scope=Scope.ADMIN),
    route("/openapi.json", openapi, methods=["GET"], scope=Scope.PUBLIC),
]

BODIES: dict[str, type[Body]] = {"/jobs": JobSubmission}
"""The declared body of each route that takes one (published by ``GET /openapi.json``)."""
