"""The gateway's cached view of the fleet, refreshed in the background.

Routing decisions (404 for a model no live node has, ``/api/tags``, ``/api/ps``) read
this snapshot instead of Redis on every request. A miss re-reads Redis at once (at most
every ``MISS_REFRESH`` seconds) so a node that just came up is seen without waiting for
the next refresh. The same loop heartbeats the gateway itself.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis

from corral import fleet, keys
from corral.connections import TRANSIENT_REDIS_ERRORS
from corral.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MISS_REFRESH = 0.1


class FleetView:
    def __init__(self, redis: Redis, gateway_id: str, *, node_ttl: float, interval: float) -> None:
        self.redis = redis
        self.gateway_id = gateway_id
        self.node_ttl = node_ttl
        self.interval = interval
        self.current = fleet.Fleet()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="fleet-view")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self.redis.zrem(keys.GATEWAYS, self.gateway_id)

    async def refresh(self) -> fleet.Fleet:
        async with self._lock:
            self.current = await fleet.read_fleet(self.redis, self.node_ttl)
            await self.redis.zadd(keys.GATEWAYS, {self.gateway_id: time.time()})
        return self.current

    async def has_model(self, model: str) -> bool:
        if self.current.has_model(model):
            return True
        if time.time() - self.current.taken_at >= MISS_REFRESH:
            return (await self.refresh()).has_model(model)
        return False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)  # a refresh period, not synchronisation
            try:
                await self.refresh()
            except TRANSIENT_REDIS_ERRORS as exc:
                log.warning("reading the node registry failed: %s", exc)
