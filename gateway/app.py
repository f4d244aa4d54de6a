"""The gateway's ASGI app: routes, error shapes and the lifespan that owns connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import orjson
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from corral import connections, loops
from corral.errors import QueueFull, RequestError, WaitTooLong
from corral.gateway.cache import ResponseCache
from corral.gateway.dialect import openai_error
from corral.gateway.fleetview import FleetView
from corral.gateway.replies import ReplyRouter
from corral.gateway.routes import jobs, ollama, openai, status
from corral.gateway.routing import ErrorHandler, FrontDoor
from corral.gateway.state import GatewayState, state_of
from corral.jobs import JobStore
from corral.load import retry_after
from corral.loops import LoopHealth
from corral.settings import GatewaySettings
from corral.tasks import cancel_and_wait

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
        cache = (
            ResponseCache(redis, store, router, settings, gateway_id, health)
            if settings.cache
            else None
        )
        app.state.corral = GatewayState(
            settings, gateway_id, redis, store, router, view, health, cache
        )
        await router.start()
        await view.start()
        loops_ = [router.task, view.task]
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
            await view.stop()
            await router.stop()
            await pubsub.aclose()
            await redis.aclose()

    routes = [*ollama.ROUTES, *openai.ROUTES, *jobs.ROUTES, *status.ROUTES]
    handlers: dict[type[Exception], ErrorHandler] = {
        RequestError: _request_error,
        RedisError: _redis_error,
        Exception: _internal_error,
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    door = FrontDoor(app, routes, handlers)
    return door


async def _watch(door: FrontDoor, tasks: list[asyncio.Task[None] | None]) -> None:
    """A background loop of the gateway that ends leaves it deaf or blind while it still
    answers: stop the server so the process exits non-zero and its supervisor restarts it."""
    try:
        await loops.watch(task for task in tasks if task is not None)
    except loops.LoopDied as exc:
        log.critical("%s; stopping the gateway", exc)
        door.fail(str(exc))
