"""Keep Redis bounded under continuous load.

Stream entries are trimmed only once acknowledged: an entry still pending (claimed,
not settled) is the only link from a dead node back to its job, so ``XTRIM MINID`` never
passes the oldest pending entry. Finished job records expire on their own (``job_ttl``
and ``result_ttl``); gateways that stopped heartbeating are dropped from the registry.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from corral import keys
from corral.connections import server_time, text

_MAX_SEQ = 2**64 - 1


async def trim_acknowledged(redis: Redis, models: list[str]) -> int:
    """Remove every acknowledged entry from every priority stream; returns how many went.

    With entries pending, everything older than the oldest of them goes; with none, every
    entry delivered so far. The floor is read before the trim, which is safe because it
    only rises meanwhile: new deliveries and new entries come after it, an acknowledged
    entry never becomes pending again, and nothing moves the group's cursor back.
    """
    removed = 0
    for model in models:
        for priority in keys.PRIORITIES:
            stream = keys.stream(model, priority)
            try:
                groups = await redis.xinfo_groups(stream)
            except ResponseError:  # no such stream yet
                continue
            group = next((g for g in groups if text(g["name"]) == keys.GROUP), None)
            if group is None:
                continue
            floor = _successor(text(group["last-delivered-id"]))
            if int(group["pending"]):
                summary = await redis.xpending(stream, keys.GROUP)
                if summary["min"] is not None:  # None: acknowledged since XINFO
                    floor = min(floor, text(summary["min"]), key=_id_key)
            # Exact, not redis-py's default ``MINID ~``: approximate trimming removes only
            # whole macro nodes (100 entries by default), so a small stream never shrank.
            removed += int(await redis.xtrim(stream, minid=floor, approximate=False))
    return removed


async def prune_gateways(redis: Redis, ttl: float) -> int:
    cutoff = await server_time(redis) - ttl  # gateways heartbeat on Redis's clock
    return int(await redis.zremrangebyscore(keys.GATEWAYS, "-inf", cutoff))


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _successor(entry_id: str) -> str:
    """The smallest stream id after ``entry_id``: ``MINID`` keeps ids at or above it."""
    ms, seq = _id_key(entry_id)
    return f"{ms + 1}-0" if seq == _MAX_SEQ else f"{ms}-{seq + 1}"
