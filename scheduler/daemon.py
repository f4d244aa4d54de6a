"""The scheduler loop: while it holds the lease, reclaim from dead nodes and tidy up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from rq import Queue

from corral import keys
from corral.connections import TRANSIENT_REDIS_ERRORS, server_time
from corral.jobs import JobStore
from corral.loops import Backoff
from corral.rqjson import SERIALIZER
from corral.scheduler import housekeeping, reclaim
from corral.scheduler.lease import Lease
from corral.scheduler.levels import Levels
from corral.scheduler.retries import RetryScheduler
from corral.settings import SchedulerSettings

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, settings: SchedulerSettings, redis: Redis, rq_redis: SyncRedis) -> None:
        self.settings = settings
        self.redis = redis
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store = JobStore(
            redis,
            job_ttl=settings.job_ttl,
            result_ttl=settings.result_ttl,
            gateway_ttl=settings.gateway_ttl,
            resume_streams=settings.resume_streams,
        )
        self.lease = Lease(redis, self.id, settings.lease_ttl)
        self.retries = RetryScheduler(
            redis,
            Queue(keys.RETRY_QUEUE, connection=rq_redis, serializer=SERIALIZER),
            Backoff(settings.retry_base, settings.retry_cap),
            max_attempts=settings.max_attempts,
            job_ttl=settings.job_ttl,
            result_ttl=settings.result_ttl,
            dead_ttl=settings.dead_ttl,
        )
        self.levels = Levels(settings)
        self._stop = asyncio.Event()
        self._was_active = False
        self.passes = 0
        self.owners = reclaim.Owners(settings.node_ttl)
        self._contact: float | None = None
        """Redis time of this scheduler's last loop that reached Redis (active or not)."""
        self._lost_redis = False
        self._grace_until = 0.0
        """No node is declared dead before this Redis time (after losing Redis for a while,
        every heartbeat looks old until the nodes have had one TTL to beat again)."""

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        log.info("scheduler %s started", self.id)
        try:
            while not self._stop.is_set():
                try:
                    if await self.lease.acquire_or_renew():
                        if not self._was_active:
                            log.info("scheduler %s is now the active one", self.id)
                            await self.retries.recover()
                            self._was_active = True
                            # It cannot tell a fleet whose heartbeats are old because Redis
                            # just stalled or restarted from a dead one: a TTL of grace.
                            self._lost_redis = True
                        await self.run_pass()
                    else:
                        self._was_active = False
                        self._contact = await server_time(self.redis)
                except TRANSIENT_REDIS_ERRORS as exc:
                    self._lost_redis = True  # grace for the nodes once it is back
                    log.warning("maintenance pass failed, retrying: %s", exc)
                except Exception:
                    # Anything else (an OOM reply while Redis refuses writes, one bad key, a
                    # racing read) must not stop reclaim and retries for the whole fleet:
                    # log it with its traceback and run the next pass.
                    self._lost_redis = True
                    log.exception(
                        "maintenance pass failed; next pass in %ss", self.settings.interval
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.settings.interval)
        finally:
            with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):
                await self.lease.release()
            log.info("scheduler %s stopped", self.id)

    async def run_pass(self) -> None:
        asked = time.monotonic()
        now = await server_time(self.redis)
        self._note_gap(now, waited=time.monotonic() - asked)
        models = await reclaim.known_models(self.redis)
        if now >= self._grace_until:
            await self.reclaim(models, now)
        self._contact = now
        await self.retries.drain()
        await self.retries.release_due()
        await self.retries.sweep_lost()
        await housekeeping.trim_acknowledged(self.redis, models)
        await housekeeping.prune_gateways(self.redis, self.settings.gateway_ttl)
        await self.levels.publish(self.redis, models)
        self.passes += 1

    def _note_gap(self, now: float, *, waited: float) -> None:
        """After a stretch without Redis (a stall, an outage, this process stopped), give
        every node one TTL to heartbeat before judging it by a heartbeat that is old only
        because nobody could write it. A stretch shows as a long wait for Redis's time
        itself (even on a first pass), or as a long gap since the last pass."""
        allowed = self.settings.interval + self.settings.node_ttl / 2
        gap = self._contact is not None and now - self._contact > allowed
        if gap or waited > allowed or self._lost_redis:
            self._lost_redis = False
            self._grace_until = now + self.settings.node_ttl
            log.warning(
                "this scheduler just became active or lost Redis for a while; no node is "
                "declared dead before each has had %gs to heartbeat",
                self.settings.node_ttl,
            )

    async def reclaim(self, models: list[str], now: float) -> None:
        """Take back what dead, stopped or unregistered nodes hold."""
        for holding, why in await self.owners.overdue(self.redis, models, now):
            count = await reclaim.reclaim(self.store, holding, why, self.settings.max_attempts)
            log.warning(
                "node %s holds jobs but is not alive: took back %d job(s) of %s p%d",
                holding.consumer,
                count,
                holding.model,
                holding.priority,
            )
        dead = await reclaim.dead_nodes(self.redis, self.settings.node_ttl, now)
        if dead:
            await self.redis.zrem(keys.NODES, *dead)
            log.warning("node(s) %s stopped heartbeating; removed from the registry", dead)
