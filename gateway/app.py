"""The gateway's ASGI app: routes, error shapes and the lifespan that owns connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import orjson
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from corral import connections, loops
from corral.errors import QueueFull, RequestError, WaitTooLong
from corral.gateway.audit import AuditLog
from corral.gateway.auth import Authenticator, unscoped
from corral.gateway.cache import ResponseCache
from corral.gateway.dialect import openai_error
from corral.gateway.fleetview import FleetView
from corral.gateway.replies import ReplyRouter
from corral.gateway.routes import jobs, ollama, openai, status
from corral.gateway.routing import ErrorHandler, FrontDoor
from corral.gateway.state import GatewayState, state_of
from corral.gateway.telemetry_loop import TelemetryLoop
from corral.jobs import JobStore
from corral.load import retry_after
from corral.loops import LoopHealth
from corral.ratelimit import RateLimiter
from corral.settings import GatewaySettings
from corral.tasks import cancel_and_wait
from corral.telemetry import Recorder

log = logging.getLogger(__name__)


def error_response(path: str, message: str, status: int) -> Response:
    body = (
        openai_error(message, status)
        if path.startswith("/v1/")
        else orjson.dumps({"error": message})
    )
    return Response(body, status_code=status, media_type="application/json; charset=utf-8")


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    path = request.url.path
    status = exc.status
    if isinstance(exc, QueueFull) and path.startswith("/v1/"):
        status = 429  # what OpenAI clients back off on (Ollama's own paths answer 503)
    response = error_response(path, exc.message, status)
    if exc.headers:
        response.headers.update(exc.headers)
    if isinstance(exc, QueueFull):
        _retry_headers(request, exc, response)
    return response


def _retry_headers(request: Request, exc: QueueFull, response: Response) -> None:
    """``Retry-After`` from the estimate the refusal carries, or else from the measured
    drain rate of the model's full queue."""
    state = state_of(request)
    seconds = exc.retry_after
    if seconds is None:
        seconds = state.fleet.load.drain_seconds(exc.model, state.settings.max_queue)
    response.headers["retry-after"] = retry_after(seconds, state.settings.retry_after_max)
    if isinstance(exc, WaitTooLong):
        response.headers["x-corral-queue-wait"] = f"{exc.wait:.1f}"


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own answers (404 for an unknown path, 405 for a wrong method) in the
    path's dialect, like every other error, instead of plain text."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    message = {404: f"{path} not found", 405: f"method {request.method} not allowed on {path}"}
    response = error_response(path, message.get(exc.status_code, str(exc.detail)), exc.status_code)
    response.headers.update(exc.headers or {})
    return response


async def _redis_error(request: Request, exc: Exception) -> Response:
    log.error("Redis failed during %s: %s", request.url.path, exc)
    return error_response(request.url.path, "the job queue is unavailable, try again", 503)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error serving %s", request.url.path, exc_info=exc)
    return error_response(request.url.path, "internal server error", 500)


def create_app(settings: GatewaySettings) -> FrontDoor:
    gateway_id = settings.resolved_gateway_id()
    door: FrontDoor

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = connections.pooled(settings.redis_url, settings.redis_pool_size)
        pubsub = connections.subscriber(settings.redis_url)
        await connections.ping(redis)
        health = LoopHealth()
        router = ReplyRouter(pubsub, redis, gateway_id, health)
        view = FleetView(
            redis,
            gateway_id,
            node_ttl=settings.node_ttl,
            interval=settings.fleet_refresh,
            health=health,
            model_grace=settings.model_grace,
            memory_limit=settings.redis_memory_limit,
        )
        store = JobStore(
            redis,
            job_ttl=settings.job_ttl,
            result_ttl=settings.result_ttl,
            gateway_ttl=settings.gateway_ttl,
        )
        recorder = Recorder()
        telemetry = TelemetryLoop(
            redis,
            recorder,
            health,
            gateway_id=gateway_id,
            redis_url=settings.redis_url,
            node_ttl=settings.node_ttl,
            gateway_ttl=settings.gateway_ttl,
        )
        cache = (
            ResponseCache(redis, store, router, settings, gateway_id, health, recorder)
            if settings.cache
            else None
        )
        auth = Authenticator(settings, redis)
        audit = AuditLog(settings.audit_log) if settings.audit_log else None
        app.state.corral = GatewayState(
            settings,
            gateway_id,
            redis,
            store,
            router,
            view,
            health,
            recorder,
            cache,
            auth=auth,
            limiter=RateLimiter(redis),
            audit=audit,
        )
        if not await auth.configured():
            log.warning(
                "no API keys are configured (CORRAL_API_KEYS is empty and `corral keys` "
                "stored none): the gateway is open to anyone who can reach it"
            )
        await router.start()
        await view.start()
        await telemetry.start()
        loops_ = [router.task, view.task, telemetry.task]
        if cache is not None:
            await cache.start()
            loops_.append(cache.task)
        watcher = asyncio.create_task(_watch(door, loops_), name="watch")
        log.info("gateway %s ready", gateway_id)
        try:
            yield
        finally:
            await cancel_and_wait(watcher)
            if cache is not None:
                await cache.stop()
            await telemetry.stop()
            await view.stop()
            await router.stop()
            await pubsub.aclose()
            await redis.aclose()
            if audit is not None:
                audit.close()

    routes: list[BaseRoute] = [*ollama.ROUTES, *openai.ROUTES, *jobs.ROUTES, *status.ROUTES]
    if missing := unscoped(routes):  # deny by default: a route must say who may call it
        raise RuntimeError(f"routes declared without a scope: {', '.join(missing)}")
    handlers: dict[type[Exception], ErrorHandler] = {
        RequestError: _request_error,
        HTTPException: _http_error,
        RedisError: _redis_error,
        Exception: _internal_error,
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    door = FrontDoor(app, routes, handlers)
    if origins := settings.cors_origin_list():
        # Outside the front door: a preflight OPTIONS never reaches a route.
        door.entry = CORSMiddleware(
            door.entry,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
            allow_headers=[
                "authorization",
                "content-type",
                "x-corral-priority",
                "x-corral-timeout",
                "x-corral-run-timeout",
                "x-corral-cache",
            ],
            expose_headers=[
                "x-corral-job-id",
                "x-corral-degraded",
                "x-corral-cache",
                "x-corral-queue-wait",
                "retry-after",
                "ratelimit-limit",
                "ratelimit-remaining",
                "ratelimit-reset",
                "ratelimit-policy",
            ],
            max_age=600,
        )
    return door


async def _watch(door: FrontDoor, tasks: list[asyncio.Task[None] | None]) -> None:
    """A background loop of the gateway that ends leaves it deaf or blind while it still
    answers: stop the server so the process exits non-zero and its supervisor restarts it."""
    try:
        await loops.watch(task for task in tasks if task is not None)
    except loops.LoopDied as exc:
        log.critical("%s; stopping the gateway", exc)
        door.fail(str(exc))
