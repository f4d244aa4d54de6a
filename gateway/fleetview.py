"""The gateway's cached view of the fleet, refreshed in the background.

Routing decisions (404 for a model no live node has, ``/api/tags``, ``/api/ps``) read
this snapshot instead of Redis on every request. A miss re-reads Redis at once (at most
every ``MISS_REFRESH`` seconds) so a node that just came up is seen without waiting for
the next refresh. The same loop heartbeats the gateway itself, on Redis's clock.

A model stays routable for ``model_grace`` seconds after the last node serving it was
seen alive, as long as that node is still registered (its heartbeat late, not removed):
a node crashing and restarting, or every heartbeat missed during a Redis stall, then
makes its jobs wait in the queue (where a node will pull them) instead of answering 404.
A node that left the registry (a graceful stop, or declared dead by the scheduler) takes
its models with it at once.

The same refresh reads Redis's ``INFO memory``: at ``memory_limit`` of its
``maxmemory`` (``CORRAL_REDIS_MEMORY_LIMIT``) ``memory_full`` is set and requests are
refused new work before Redis itself refuses writes (a job half stored, a stream whose
chunks cannot be kept). A request reads one attribute; no request reads Redis for it.

The same refresh reads the load report the active scheduler publishes (``corral.load``):
``level`` and ``load`` are plain attributes, so a request reads them for free. A report
that cannot be re-read is kept no longer than its own TTL, then the level falls to 0.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from corral import fleet, keys, loops
from corral.load import NO_LOAD, LoadReport
from corral.loops import LoopHealth
from corral.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MISS_REFRESH = 0.1
LOOP = "fleet-view"


class FleetView:
    def __init__(
        self,
        redis: Redis,
        gateway_id: str,
        *,
        node_ttl: float,
        interval: float,
        health: LoopHealth,
        model_grace: float = 60.0,
        memory_limit: float = 0.0,
    ) -> None:
        self.redis = redis
        self.gateway_id = gateway_id
        self.node_ttl = node_ttl
        self.interval = interval
        self.health = health
        self.model_grace = model_grace
        self.current = fleet.Fleet()
        self.task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._read_at = 0.0  # monotonic: local ages only
        self._seen: dict[str, tuple[frozenset[str], float]] = {}
        """node id -> (models it served, when it was last seen alive; monotonic)."""
        self.load: LoadReport = NO_LOAD
        """The scheduler's last load report (level 0 and no figures when there is none)."""
        self.level: int = 0
        """``load.level``: the degradation level requests apply (0 normal ... 3 critical)."""
        self._load_read_at = 0.0  # monotonic
        self.memory_limit = memory_limit
        self.memory_share = 0.0
        """Redis's used_memory / maxmemory at the last refresh (0 without a maxmemory)."""
        self.memory_full = False
        """Whether new work is refused: ``memory_share`` reached ``memory_limit``."""

    async def start(self) -> None:
        self.health.register(LOOP, stale_after=max(5 * self.interval, 10.0))
        await self.refresh()
        self.health.ok(LOOP)
        self.task = asyncio.create_task(
            loops.every(LOOP, self.interval, self.refresh, self.health), name=LOOP
        )

    async def stop(self) -> None:
        if self.task is not None:
            await cancel_and_wait(self.task)
        await self.redis.zrem(keys.GATEWAYS, self.gateway_id)

    async def refresh(self) -> fleet.Fleet:
        async with self._lock:
            try:
                current = await fleet.read_fleet(self.redis, self.node_ttl)
                await fleet.touch(self.redis, keys.GATEWAYS, self.gateway_id)
                self._set_load(LoadReport.decode(await self.redis.get(keys.LOAD)))
                if self.memory_limit > 0:
                    await self._read_memory()
            except Exception:
                self._expire_load()
                raise
            self.current = current
            self._read_at = now = time.monotonic()
            for node in current.nodes:
                if node.get("state") in fleet.SERVING_STATES:
                    served = frozenset(str(m.get("name")) for m in node.get("models", []))
                    self._seen[str(node["node_id"])] = (served, now)
            for gone in set(self._seen) - current.registered:
                del self._seen[gone]
        return self.current

    def _set_load(self, report: LoadReport) -> None:
        if report.level != self.level:
            log.info(
                "degradation level %d -> %d (load %.2f)", self.level, report.level, report.load
            )
        self.load, self.level = report, report.level
        self._load_read_at = time.monotonic()

    async def _read_memory(self) -> None:
        try:
            info = await self.redis.info("memory")
        except ResponseError as exc:
            # A Redis without INFO (the embedded one of `make demo`) or a user not granted
            # it: no guard, rather than no gateway.
            log.warning("cannot read Redis memory (%s): the memory guard is off", exc)
            self.memory_limit = 0.0
            return
        self._set_memory(info)

    def _set_memory(self, info: dict[str, object]) -> None:
        limit = int(str(info.get("maxmemory", 0)))
        used = int(str(info.get("used_memory", 0)))
        self.memory_share = used / limit if limit > 0 else 0.0
        full = limit > 0 and self.memory_share >= self.memory_limit
        if full != self.memory_full:
            log.warning(
                "Redis memory at %.0f%% of maxmemory: new work %s",
                100 * self.memory_share,
                "refused" if full else "accepted again",
            )
        self.memory_full = full

    def _expire_load(self) -> None:
        """Redis unreadable: keep the last report only while it is valid (its TTL from
        when it was read), so a level cannot outlive the scheduler that set it."""
        if self.load is not NO_LOAD and time.monotonic() - self._load_read_at > self.load.ttl:
            log.warning("load report unreadable for %gs; degradation level 0", self.load.ttl)
            self.load, self.level = NO_LOAD, 0

    def recently_served(self, model: str) -> bool:
        oldest = time.monotonic() - self.model_grace
        return any(model in served and at >= oldest for served, at in self._seen.values())

    async def has_model(self, model: str) -> bool:
        if self.current.has_model(model):
            return True
        if time.monotonic() - self._read_at >= MISS_REFRESH:
            try:
                if (await self.refresh()).has_model(model):
                    return True
            except Exception:
                if not self.recently_served(model):
                    raise
                log.warning("node registry unreadable; %s was served recently", model)
        return self.recently_served(model)
