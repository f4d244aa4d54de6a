"""Releasing retries whose backoff has passed from RQ's scheduled registry to its queue
(scheduler/retries.py), through RQ's public API: once each, and none lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from rq import Queue
from rq.job import Job, JobStatus

from corral import keys
from corral.jobs import JobSpec, JobStore
from corral.keys import JobKind
from corral.loops import Backoff
from corral.rqjson import SERIALIZER
from corral.scheduler.retries import LOST_AFTER, RetryScheduler, rq_job_id

NOW = Backoff(0.0, 0.0)
"""A retry due at once."""

LATER = Backoff(120.0, 120.0)
"""A retry due in a minute or two."""


@pytest.fixture
async def sync(redis_url: str) -> AsyncIterator[SyncRedis]:
    client = SyncRedis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def queue(sync: SyncRedis) -> Queue:
    return Queue(keys.RETRY_QUEUE, connection=sync, serializer=SERIALIZER)


def retries(redis: Redis, sync: SyncRedis, backoff: Backoff) -> RetryScheduler:
    return RetryScheduler(redis, queue(sync), backoff, max_attempts=3, job_ttl=60, result_ttl=60)


async def failed_once(redis: Redis, scheduler: RetryScheduler) -> str:
    """A job whose first attempt failed, its retry scheduled in RQ; returns the RQ job id."""
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = JobSpec(
        kind=JobKind.GENERATE, model="llama3:latest", request=b"{}", priority=5,
        gateway_id="gw", stream=False, wait=False,
    )  # fmt: skip
    await store.enqueue(spec, max_queue=1000)
    claimed = await store.claim("llama3:latest", "node-a")
    assert claimed is not None and await store.retry(claimed, "node-a", "boom", 500)
    assert await scheduler.drain() == 1
    return rq_job_id(spec.job_id, 1)


async def test_a_due_retry_is_queued_and_a_later_one_waits(redis: Redis, sync: SyncRedis) -> None:
    due = await failed_once(redis, retries(redis, sync, NOW))
    later = await failed_once(redis, retries(redis, sync, LATER))

    assert await retries(redis, sync, NOW).release_due() == 1
    assert queue(sync).get_job_ids() == [due]
    assert Job.fetch(due, connection=sync, serializer=SERIALIZER).get_status() == JobStatus.QUEUED
    assert later in queue(sync).scheduled_job_registry
    assert (
        Job.fetch(later, connection=sync, serializer=SERIALIZER).get_status() == JobStatus.SCHEDULED
    )


async def test_retries_released_by_two_schedulers_at_once_are_queued_once(
    redis: Redis, sync: SyncRedis
) -> None:
    # A scheduler that lost its lease may still be in a pass while the new holder runs one.
    scheduled = [await failed_once(redis, retries(redis, sync, NOW)) for _ in range(60)]
    first, second = retries(redis, sync, NOW), retries(redis, sync, NOW)

    released = await asyncio.gather(first.release_due(), second.release_due())

    assert sum(released) == len(scheduled)
    queued = queue(sync).get_job_ids()
    assert sorted(queued) == sorted(scheduled)  # each once: none twice, none lost
    assert queue(sync).scheduled_job_registry.get_job_ids() == []


async def test_an_entry_whose_rq_job_is_gone_leaves_the_registry(
    redis: Redis, sync: SyncRedis
) -> None:
    rq_id = await failed_once(redis, retries(redis, sync, NOW))
    sync.delete(
        Job.fetch(rq_id, connection=sync, serializer=SERIALIZER).key
    )  # expired, or deleted by hand

    assert await retries(redis, sync, NOW).release_due() == 0
    assert rq_id not in queue(sync).scheduled_job_registry
    assert queue(sync).get_job_ids() == []


async def test_a_release_that_died_halfway_is_scheduled_again(
    redis: Redis, sync: SyncRedis
) -> None:
    scheduler = retries(redis, sync, NOW)
    rq_id = await failed_once(redis, scheduler)
    [job_id] = [m.decode() for m in await redis.zrange(keys.RETRY_SCHEDULED, 0, -1)]
    due = await redis.zscore(keys.RETRY_SCHEDULED, job_id)
    assert due is not None
    # The release took it off the registry and died before putting it on the queue: RQ
    # still calls it scheduled, but nothing will ever run it.
    queue(sync).scheduled_job_registry.remove(rq_id)
    assert (
        Job.fetch(rq_id, connection=sync, serializer=SERIALIZER).get_status() == JobStatus.SCHEDULED
    )

    assert await scheduler.sweep_lost(now=due + 10 * LOST_AFTER) == 1
    assert await redis.lrange(keys.RETRY_INBOX, 0, -1) == [job_id.encode()]
    assert await scheduler.drain() == 1
    assert rq_id in queue(sync).scheduled_job_registry
