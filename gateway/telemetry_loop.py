"""The gateway's telemetry loop: once a second, write this process's figures to Redis and
sample the fleet's gauges for the dashboard's graphs.

Requests record into ``GatewayState.recorder`` in memory; this loop makes that one
pipelined round trip a second, whatever the request rate. Sampling (queue depth by
priority, slots per node) reads a fleet snapshot: with several gateways, the one that
takes the second's lock (``SET NX``) samples it, so the fleet's cost stays one snapshot
a second.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from corral import keys, loops, series
from corral.loops import LoopHealth
from corral.snapshot import take_snapshot
from corral.tasks import cancel_and_wait
from corral.telemetry import Recorder

log = logging.getLogger(__name__)

LOOP = "telemetry"


class TelemetryLoop:
    def __init__(
        self,
        redis: Redis,
        recorder: Recorder,
        health: LoopHealth,
        *,
        gateway_id: str,
        redis_url: str,
        node_ttl: float,
        gateway_ttl: float,
        interval: float = 1.0,
    ) -> None:
        self.redis = redis
        self.recorder = recorder
        self.health = health
        self.gateway_id = gateway_id
        self.redis_url = redis_url
        self.node_ttl = node_ttl
        self.gateway_ttl = gateway_ttl
        self.interval = interval
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.health.register(LOOP, stale_after=max(10 * self.interval, 10.0))
        self.task = asyncio.create_task(
            loops.every(LOOP, self.interval, self.tick, self.health), name=LOOP
        )

    async def stop(self) -> None:
        """Stop the loop and write what is left (best effort: Redis may be gone)."""
        if self.task is not None:
            await cancel_and_wait(self.task)
        try:
            await self.recorder.flush(self.redis)
        except (RedisError, OSError) as exc:
            log.warning("last telemetry flush failed: %s", exc)

    async def tick(self) -> None:
        try:
            await self.sample()
        finally:  # a failed sample must not hold back the counts
            await self.recorder.flush(self.redis)

    async def sample(self) -> None:
        second = self.recorder.second()
        if not await self.redis.set(keys.sample_lock(second), self.gateway_id, nx=True, ex=10):
            return
        snapshot = await take_snapshot(
            self.redis, self.redis_url, node_ttl=self.node_ttl, gateway_ttl=self.gateway_ttl
        )
        self.recorder.gauges(series.sample(snapshot))
