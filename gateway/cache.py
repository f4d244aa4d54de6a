"""The shared response cache on the job path: look up, single-flight, answer, store.

``admission.relay`` hands every generate and chat request here once its model is
resolved. A request that is not cacheable (not deterministic and not widened, or sent
with ``X-Corral-Cache: bypass``) goes straight to its own job, tagged ``bypass``. Any
other is answered from L1 at once when found there (``hit``); else it joins its key's
``Flight`` (``corral.gateway.flights``), which answers from L2 (``hit``), follows the job
already running for the key on any gateway (``hit``: no job of its own), or runs it
(``miss``). The answer goes out as every answer does: NDJSON or SSE chunks when the
client streams, one object otherwise, in the request's own dialect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from corral import loops
from corral.gateway.cache_key import CACHEABLE_KINDS, cache_key, deterministic
from corral.gateway.cache_store import Answer, CacheStore
from corral.gateway.dialect import Dialect
from corral.gateway.flights import Flight, renew_locks
from corral.gateway.relay import DEGRADED_HEADER, JSON_TYPE, JobResponse, _start, request_labels
from corral.gateway.replies import Inbox, ReplyRouter
from corral.jobs import JobSpec, JobStore
from corral.loops import LoopHealth
from corral.settings import GatewaySettings
from corral.tasks import cancel_and_wait
from corral.telemetry import Recorder

log = logging.getLogger(__name__)

HEADER = "x-corral-cache"
"""Request: ``bypass`` skips the cache. Answer: ``hit``, ``miss`` or ``bypass``."""
_HIT, _MISS, _BYPASS = b"hit", b"miss", b"bypass"
LOOP = "cache-flight-locks"


class ResponseCache:
    """The cache of one gateway process; ``start()`` in the lifespan, ``stop()`` after."""

    def __init__(
        self,
        redis: Redis,
        store_jobs: JobStore,
        router: ReplyRouter,
        settings: GatewaySettings,
        gateway_id: str,
        health: LoopHealth,
        recorder: Recorder | None = None,
    ) -> None:
        self.redis = redis
        self.recorder = recorder
        """Where each outcome is counted for the dashboard's hit-rate graph."""
        self.store_jobs = store_jobs
        self.router = router
        self.settings = settings
        self.gateway_id = gateway_id
        self.health = health
        self.store = CacheStore(redis, settings)
        self.flights: dict[str, Flight] = {}
        """Flights this process is finding answers for, by key (requests join them)."""
        self.leading: dict[str, Flight] = {}
        """Flights whose lock this process holds and renews."""
        self.tasks: set[asyncio.Task[None]] = set()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(
            loops.every(LOOP, self.settings.cache_flight_ttl / 3, self._renew, self.health),
            name=LOOP,
        )

    async def _renew(self) -> None:
        await renew_locks(self)
        self.health.ok(LOOP)

    async def stop(self) -> None:
        if self.task is not None:
            await cancel_and_wait(self.task)
        for task in list(self.tasks):
            await cancel_and_wait(task)

    def takes(self, request: Request, spec: JobSpec, body: dict[str, Any], *, level: int) -> bool:
        """Whether the cache answers this request (see the module's docstring); the caller
        submits the job itself otherwise, and marks it ``bypassed``.

        ``level`` is the fleet's degradation level: from ``cache_widen_level`` on (when
        set), answers that are not deterministic are cached and shared too."""
        settings = self.settings
        return not (
            spec.kind not in CACHEABLE_KINDS
            or request.headers.get(HEADER, "").strip().lower() == "bypass"
            or not (settings.cache_widen or _widened(level, settings) or deterministic(body))
        )

    def bypassed(self, response: JobResponse) -> None:
        """Mark and count a request the cache was asked about and did not take."""
        response.extra_headers.append((HEADER.encode(), _BYPASS))
        self._count("bypass")

    async def answer(
        self, spec: JobSpec, dialect: Dialect, body: dict[str, Any], *, wait: float, level: int
    ) -> Response:
        """The response to a request the cache ``takes``: from L1, or from the flight that
        runs (or found in L2) the one job for its key."""
        started = time.perf_counter()
        key = cache_key(spec.kind, spec.stream, body)
        found = self.store.local(key)
        if found is not None:
            self._count("hit")
            return CachedResponse(found, dialect, spec, self.recorder, started)
        flight = self.flights.get(key)
        if flight is None:
            flight = self.flights[key] = Flight(self, key, spec, level)
            flight.start()
        inbox = flight.join()
        try:
            await asyncio.shield(flight.ready)
        except BaseException:
            await asyncio.shield(flight.leave(inbox))
            raise
        outcome = _MISS if flight.leading and inbox is flight.first else _HIT
        self._count(outcome.decode())
        return FlightResponse(flight, inbox, spec, dialect, wait, outcome, started)

    def _count(self, outcome: str) -> None:
        self.store.outcomes[outcome] += 1
        if self.recorder is not None:
            self.recorder.tick(f"cache:{outcome}")


def _widened(level: int, settings: GatewaySettings) -> bool:
    """Whether the degradation level makes requests that are not deterministic cacheable."""
    return bool(settings.cache_widen_level) and level >= settings.cache_widen_level


class CachedResponse(Response):
    """An answer from L1, written as the job's answer would be, in one write."""

    def __init__(
        self,
        answer: Answer,
        dialect: Dialect,
        spec: JobSpec,
        recorder: Recorder | None,
        started: float,
    ) -> None:
        self.answer = answer
        self.dialect = dialect
        self.spec = spec
        self.recorder = recorder
        self.started = started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(HEADER.encode(), _HIT)]
        if self.spec.degraded:
            headers.append((DEGRADED_HEADER, self.spec.degraded.encode()))
        dialect, answer = self.dialect, self.answer
        if self.spec.stream:
            body = b"".join([*map(dialect.chunk, answer.chunks), dialect.last(answer.final)])
            await _start(send, 200, dialect.stream_media_type.encode(), headers, None)
        else:
            body = dialect.single(answer.final)
            await _start(send, 200, JSON_TYPE, headers, len(body))
        await send({"type": "http.response.body", "body": body})
        if self.recorder is not None:  # counted like any answered request
            labels = request_labels(self.spec, dialect, "done")
            took = time.perf_counter() - self.started
            self.recorder.count("req", labels)
            self.recorder.observe("ttft", labels, took)
            self.recorder.observe("total", labels, took)


class FlightResponse(JobResponse):
    """A request's answer from its flight: the relay of ``JobResponse``, but leaving the
    flight instead of cancelling the job, which others may share."""

    def __init__(
        self,
        flight: Flight,
        inbox: Inbox,
        spec: JobSpec,
        dialect: Dialect,
        timeout: float,
        outcome: bytes,
        started: float,
    ) -> None:
        cache = flight.cache
        super().__init__(
            spec,
            cache.store_jobs,
            cache.router,
            dialect,
            inbox,
            timeout,
            cache.recorder,
            started,
        )
        self.flight = flight
        self.extra_headers = [(HEADER.encode(), outcome)]
        if spec.degraded:
            self.extra_headers.append((DEGRADED_HEADER, spec.degraded.encode()))
        if flight.job_id:
            self.extra_headers.append((b"x-corral-job-id", flight.job_id.encode()))

    def _release(self) -> Coroutine[Any, Any, None]:
        return self.flight.leave(self.queue)

    async def _cancel(self, reason: str, *, expired: bool = False) -> None:
        # This request stops waiting; the job goes on while others share it.
        self._settled = True
        await self.flight.leave(self.queue)
