"""Turn failed attempts into RQ retry jobs, scheduled with exponential backoff and jitter.

Workers put the ids of jobs whose attempt failed retriably in the retry inbox; the active
scheduler moves each to a processing list (so a crash here loses none), schedules an RQ
job that will run ``scheduler.retry_job.revive`` after the backoff, and drops it from the
processing list.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta

from redis.asyncio import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import ScheduledJobRegistry

from corral import keys

log = logging.getLogger(__name__)

PROCESSING = f"{keys.RETRY_INBOX}:processing"
DEAD_LETTER_TTL = 30 * 24 * 3600
"""Seconds RQ keeps a dead-lettered job in its FailedJobRegistry."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""

    base: float
    cap: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(attempt - 1, 0))
        return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


class RetryScheduler:
    def __init__(
        self,
        redis: Redis,
        queue: Queue,
        backoff: Backoff,
        *,
        max_attempts: int,
        job_ttl: int,
        result_ttl: int,
        rng: random.Random | None = None,
    ) -> None:
        self.redis = redis
        self.queue = queue
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.job_ttl = job_ttl
        self.result_ttl = result_ttl
        self.rng = rng or random.Random()

    async def recover(self) -> None:
        """Put back ids a previous active scheduler took but did not finish scheduling."""
        while await self.redis.lmove(PROCESSING, keys.RETRY_INBOX, "RIGHT", "LEFT"):
            pass

    async def drain(self) -> int:
        scheduled = 0
        while raw := await self.redis.lmove(keys.RETRY_INBOX, PROCESSING, "LEFT", "RIGHT"):
            job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            await self._schedule(job_id)
            await self.redis.lrem(PROCESSING, 1, job_id)
            scheduled += 1
        return scheduled

    async def release_due(self) -> int:
        """Move retries whose backoff has passed from RQ's scheduled registry to its queue.

        The active scheduler does this itself (its lease makes it the only one) rather
        than relying on the RQ worker's scheduler, whose lock outlives a killed holder by
        a minute. Enqueue and removal go in one transaction, so a retry is neither lost
        nor run twice.
        """
        return await asyncio.to_thread(self._release_due)

    def _release_due(self) -> int:
        registry = ScheduledJobRegistry(queue=self.queue)  # type: ignore[no-untyped-call]
        due = registry.get_jobs_to_schedule(int(time.time()))
        for job_id in due:
            try:
                job = Job.fetch(job_id, connection=self.queue.connection)
            except NoSuchJobError:
                registry.remove(job_id)
                continue
            with self.queue.connection.pipeline() as pipe:
                self.queue.enqueue_job(job, pipeline=pipe)
                registry.remove(job, pipeline=pipe)
                pipe.execute()
        return len(due)

    async def _schedule(self, job_id: str) -> None:
        model, attempts = await self.redis.hmget(keys.job(job_id), "model", "attempts")
        attempt = int(attempts or 0)
        last = attempt >= self.max_attempts
        delay = 0.0 if last else self.backoff.delay(attempt, self.rng)
        name = model.decode() if isinstance(model, bytes) else str(model)
        await asyncio.to_thread(
            self.queue.enqueue_in,
            timedelta(seconds=delay),
            "scheduler.retry_job.revive",
            job_id,
            self.max_attempts,
            self.job_ttl,
            self.result_ttl,
            job_id=f"corral-{job_id}-{attempt}",
            description=f"{'dead-letter' if last else 'retry'} corral job {job_id} "
            f"({name}, after attempt {attempt})",
            meta={"corral_job": job_id, "model": name, "attempt": attempt},
            result_ttl=3600,
            failure_ttl=DEAD_LETTER_TTL,
        )
        log.info("job %s: attempt %d failed; retry scheduled in %.2fs", job_id, attempt, delay)
