"""The scheduler loop: while it holds the lease, reclaim from dead nodes and tidy up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError
from rq import Queue

from corral import keys
from corral.connections import TRANSIENT_REDIS_ERRORS
from corral.jobs import JobStore
from corral.settings import SchedulerSettings
from scheduler import housekeeping, reclaim
from scheduler.lease import Lease
from scheduler.retries import Backoff, RetryScheduler

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, settings: SchedulerSettings, redis: Redis, rq_redis: SyncRedis) -> None:
        self.settings = settings
        self.redis = redis
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store = JobStore(redis, job_ttl=settings.job_ttl, result_ttl=settings.result_ttl)
        self.lease = Lease(redis, self.id, settings.lease_ttl)
        self.retries = RetryScheduler(
            redis,
            Queue(keys.RETRY_QUEUE, connection=rq_redis),
            Backoff(settings.retry_base, settings.retry_cap),
            max_attempts=settings.max_attempts,
            job_ttl=settings.job_ttl,
            result_ttl=settings.result_ttl,
        )
        self._stop = asyncio.Event()
        self._was_active = False
        self.passes = 0

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
                        await self.run_pass()
                    else:
                        self._was_active = False
                except TRANSIENT_REDIS_ERRORS as exc:
                    log.warning("maintenance pass failed, retrying: %s", exc)
                except (RedisError, ValueError, KeyError, AttributeError, TypeError):
                    # One bad key or racing read must not stop reclaim and retries for the
                    # whole fleet: log it with its traceback and run the next pass.
                    log.exception(
                        "maintenance pass hit a Redis error; next pass in %ss",
                        self.settings.interval,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.settings.interval)
        finally:
            with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):
                await self.lease.release()
            log.info("scheduler %s stopped", self.id)

    async def run_pass(self) -> None:
        models = await reclaim.known_models(self.redis)
        for node_id in await reclaim.dead_nodes(self.redis, self.settings.node_ttl):
            count = await reclaim.reclaim_node(
                self.store, node_id, models, self.settings.max_attempts
            )
            await self.redis.zrem(keys.NODES, node_id)
            log.warning("node %s is dead: took back %d job(s)", node_id, count)
        await self.retries.drain()
        await self.retries.release_due()
        await self.retries.sweep_lost()
        await housekeeping.trim_acknowledged(self.redis, models)
        await housekeeping.prune_gateways(self.redis, self.settings.gateway_ttl)
        self.passes += 1
