"""Turn failed attempts into RQ retry jobs, scheduled with exponential backoff and jitter.

Workers put the ids of jobs whose attempt failed retriably in the retry inbox; the active
scheduler moves each to a processing list (so a crash here loses none), schedules an RQ
job that will run ``corral.scheduler.retry_job.revive`` after the backoff, notes it as scheduled
and drops it from the processing list. A scheduled retry still waiting long after it was
due has lost its RQ job (deleted by hand, or its RQ run crashed): it is scheduled again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime

from redis.asyncio import Redis
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry

from corral import keys
from corral.connections import server_time, text
from corral.loops import Backoff
from corral.rqjson import SERIALIZER

log = logging.getLogger(__name__)

DEAD_LETTER_TTL = 30 * 24 * 3600
"""Seconds RQ keeps a dead-lettered job in its FailedJobRegistry."""

LOST_AFTER = 60.0
"""Seconds past its due time after which a retry whose RQ job is gone counts as lost."""

PENDING = frozenset({"scheduled", "queued", "started", "deferred"})
"""RQ job states in which the retry is still on its way."""

RELEASE_BATCH = 1000
"""Most retries one pass releases; the rest go on the next pass."""


def rq_job_id(job_id: str, attempt: int) -> str:
    """The RQ job that retries (or dead-letters) ``job_id`` after ``attempt`` failed."""
    return f"corral-{job_id}-{attempt}"


class RetryScheduler:
    def __init__(
        self,
        redis: Redis,
        queue: Queue,
        backoff: Backoff,
        *,
        max_attempts: int,
        job_ttl: int,
        dead_ttl: int = 7 * 86_400,
        result_ttl: int,
        rng: random.Random | None = None,
    ) -> None:
        self.redis = redis
        self.queue = queue
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.job_ttl = job_ttl
        self.dead_ttl = dead_ttl
        self.result_ttl = result_ttl
        self.rng = rng or random.Random()

    async def recover(self) -> None:
        """Put back ids a previous active scheduler took but did not finish scheduling."""
        while await self.redis.lmove(keys.RETRY_PROCESSING, keys.RETRY_INBOX, "RIGHT", "LEFT"):
            pass

    async def drain(self) -> int:
        # Ids left in the processing list by a pass that failed midway: only the active
        # scheduler drains, one pass at a time, so none of them is being scheduled now.
        await self.recover()
        scheduled = 0
        inbox, processing = keys.RETRY_INBOX, keys.RETRY_PROCESSING
        while raw := await self.redis.lmove(inbox, processing, "LEFT", "RIGHT"):
            job_id = text(raw)
            await self._schedule(job_id)
            await self.redis.lrem(keys.RETRY_PROCESSING, 1, job_id)
            scheduled += 1
        return scheduled

    async def release_due(self) -> int:
        """Move retries whose backoff has passed from RQ's scheduled registry to its queue.

        The active scheduler does this itself (its lease makes it the only one) rather
        than relying on the RQ worker's scheduler, whose lock outlives a killed holder by
        a minute. A retry is never run twice (see ``_release_due``); one whose release
        died halfway is found by ``sweep_lost``.
        """
        return await asyncio.to_thread(self._release_due)

    async def sweep_lost(self, now: float | None = None) -> int:
        """Schedule again the retries overdue by ``LOST_AFTER`` whose RQ job is gone."""
        now = await server_time(self.redis) if now is None else now
        overdue = await self.redis.zrangebyscore(
            keys.RETRY_SCHEDULED, "-inf", now - LOST_AFTER, start=0, num=100
        )
        lost = 0
        for raw in overdue:
            job_id = text(raw)
            state, attempts = await self.redis.hmget(keys.job(job_id), "state", "attempts")
            if state != b"retrying":  # revived, dead-lettered, cancelled or expired
                await self.redis.zrem(keys.RETRY_SCHEDULED, job_id)
                continue
            status = await asyncio.to_thread(self._rq_status, job_id, int(attempts or 0))
            if status in PENDING:  # late (the RQ worker may be restarting), not lost
                await self.redis.zadd(keys.RETRY_SCHEDULED, {job_id: now})
                continue
            log.warning(
                "job %s: its retry's RQ job is %s; scheduling the retry again",
                job_id,
                status or "gone",
            )
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(keys.RETRY_SCHEDULED, job_id)
                pipe.rpush(keys.RETRY_INBOX, job_id)
                await pipe.execute()
            lost += 1
        return lost

    def _rq_status(self, job_id: str, attempt: int) -> str | None:
        rq_id = rq_job_id(job_id, attempt)
        try:
            job = Job.fetch(rq_id, connection=self.queue.connection, serializer=SERIALIZER)
        except NoSuchJobError:
            return None
        status = job.get_status(refresh=False)
        if status == JobStatus.SCHEDULED and rq_id not in self.queue.scheduled_job_registry:
            return "stranded"  # taken off the registry by a release that died before enqueueing
        return None if status is None else str(status.value)

    def _release_due(self) -> int:
        """Through RQ's public registry API: ``requeue`` moves one job from the registry
        to its queue, and only the caller whose removal from the registry succeeded
        enqueues it, so a retry released by two schedulers at once still runs once."""
        registry: ScheduledJobRegistry = self.queue.scheduled_job_registry
        now, _ = self.queue.connection.time()  # Redis's clock, as when it was scheduled
        released = 0
        for rq_id in registry.get_job_ids(0, RELEASE_BATCH - 1):  # the soonest due first
            try:
                if registry.get_scheduled_time(rq_id).timestamp() > now:
                    break
                registry.requeue(rq_id)
            except InvalidJobOperation:
                continue  # released meanwhile by another scheduler
            except NoSuchJobError:
                # Its RQ job was deleted (by hand, say): drop the entry; sweep_lost
                # schedules the retry again.
                registry.remove(rq_id)
                continue
            released += 1
        return released

    async def _schedule(self, job_id: str) -> None:
        model, attempts, limit = await self.redis.hmget(
            keys.job(job_id), "model", "attempts", "max_attempts"
        )
        attempt = int(attempts or 0)
        max_attempts = int(limit or self.max_attempts)  # the job's own limit
        last = attempt >= max_attempts
        delay = 0.0 if last else self.backoff.delay(attempt, self.rng)
        name = text(model)
        due = await server_time(self.redis) + delay
        await asyncio.to_thread(
            self.queue.enqueue_at,
            # Due on Redis's clock, which is also what releases it (see _release_due).
            datetime.fromtimestamp(due, UTC),
            "corral.scheduler.retry_job.revive",
            job_id,
            max_attempts,
            self.job_ttl,
            self.result_ttl,
            self.dead_ttl,
            job_id=rq_job_id(job_id, attempt),
            description=f"{'dead-letter' if last else 'retry'} corral job {job_id} "
            f"({name}, after attempt {attempt})",
            meta={"corral_job": job_id, "model": name, "attempt": attempt},
            result_ttl=3600,
            failure_ttl=DEAD_LETTER_TTL,
        )
        await self.redis.zadd(keys.RETRY_SCHEDULED, {job_id: due})
        log.info("job %s: attempt %d failed; retry scheduled in %.2fs", job_id, attempt, delay)
