"""Which of the models' priority streams exist.

Asking a missing stream for its pending entries (``XPENDING``) is an error reply, and
some Redis-compatible servers (fakeredis, behind ``make demo`` where no redis-server is
installed) drop the connection after one. So readers of pending entries look first.
"""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis

from corral import keys


async def existing_streams(redis: Redis, models: Iterable[str]) -> list[tuple[str, int]]:
    """(model, priority) of every stream of ``models`` that exists, in one round trip."""
    candidates = [(m, p) for m in models for p in keys.PRIORITIES]
    if not candidates:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for model, priority in candidates:
            pipe.exists(keys.stream(model, priority))
        found = await pipe.execute()
    return [stream for stream, exists in zip(candidates, found, strict=True) if exists]
