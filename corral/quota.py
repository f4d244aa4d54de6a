"""Request bytes each key keeps stored in job records: the one counter, in one module.

The gateway charges a ``wait: false`` job's request body here when it enqueues it and
refuses the job when the key's class quota would be passed. Whatever drops a stored
request (a cancel through the API today; the end of a job that can no longer be retried
later) calls ``release``. The counter expires ``job_ttl`` after its last charge, because
a record that simply expires tells nobody: a key's count can therefore stay high for at
most the life of its newest job, never for good.
"""

from __future__ import annotations

from redis.asyncio import Redis

from corral import keys


async def charge(redis: Redis, key_id: str, nbytes: int, *, quota: int, ttl: int) -> int | None:
    """Add ``nbytes`` to the key's count unless that passes ``quota`` (0: no quota);
    returns the new count, or None (nothing charged) when it would pass."""
    name = keys.quota_bytes(key_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incrby(name, nbytes)
        pipe.expire(name, ttl)
        total, _ = await pipe.execute()
    if quota and int(total) > quota:
        await redis.decrby(name, nbytes)
        return None
    return int(total)


async def release(redis: Redis, key_id: str, nbytes: int) -> None:
    """Give back what a dropped request was charged (never below zero)."""
    name = keys.quota_bytes(key_id)
    left = await redis.decrby(name, nbytes)
    if int(left) < 0:
        await redis.set(name, 0, keepttl=True)


async def usage(redis: Redis, key_id: str) -> int:
    return int(await redis.get(keys.quota_bytes(key_id)) or 0)
