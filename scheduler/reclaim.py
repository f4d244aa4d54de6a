"""Take back the jobs a dead node held and put them in front of the live ones at once.

A node is dead when its heartbeat is older than ``node_ttl`` (SIGKILL, power loss,
network cut). Its claimed entries sit in the consumer group's pending list under its
name; each is handed back through the requeue script, which also fails jobs that
already streamed part of an answer and poison jobs past ``max_attempts``.
"""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis

from corral import keys
from corral.connections import text
from corral.jobs import JobStore

log = logging.getLogger(__name__)

BATCH = 500


async def known_models(redis: Redis) -> list[str]:
    return sorted(text(m) for m in await redis.smembers(keys.MODELS))


async def dead_nodes(redis: Redis, node_ttl: float) -> list[str]:
    cutoff = time.time() - node_ttl
    ids = await redis.zrangebyscore(keys.NODES, "-inf", cutoff)
    return [text(i) for i in ids]


async def reclaim_node(store: JobStore, node_id: str, models: list[str], max_attempts: int) -> int:
    """Hand back every job ``node_id`` holds; returns how many entries were settled."""
    redis = store.redis
    settled = 0
    for model in models:
        for priority in keys.PRIORITIES:
            stream = keys.stream(model, priority)
            if not await redis.exists(stream):
                continue
            while True:
                pending = await redis.xpending_range(
                    stream, keys.GROUP, min="-", max="+", count=BATCH, consumername=node_id
                )
                if not pending:
                    break
                for item in pending:
                    entry_id = text(item["message_id"])
                    job_id = await _job_of(redis, stream, entry_id)
                    outcome = await store.requeue(
                        job_id,
                        model,
                        priority,
                        entry_id,
                        node_id,
                        f"node {node_id} died",
                        max_attempts=max_attempts,
                    )
                    settled += 1
                    log.info("job %s from dead node %s: %s", job_id, node_id, _OUTCOMES[outcome])
    return settled


_OUTCOMES = {
    0: "already settled",
    1: "requeued",
    2: "failed (part of its answer was already streamed)",
    3: "out of attempts: to the dead-letter queue",
}


async def _job_of(redis: Redis, stream: str, entry_id: str) -> str:
    entries = await redis.xrange(stream, entry_id, entry_id)
    if not entries:
        return ""  # trimmed away; the requeue script then only acknowledges it
    fields = entries[0][1] or {}
    return text(fields.get(b"j") or fields.get("j") or b"")
