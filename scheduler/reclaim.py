"""Take back the jobs held by consumers that are not live nodes, and queue them again.

A stream entry pending under a consumer name is a job that node claimed and has not
settled. It is taken back when its owner has not been seen for ``node_ttl`` seconds:
a registered node whose heartbeat is that old (SIGKILL, power loss, network cut), or
a consumer that is not in the registry at all (a worker that left it while holding
entries because its hand-back failed, or that an operator removed) for that long. The
pending lists are the truth here, not the registry: every pending entry has a live
owner or is reclaimed. Each entry is handed back through the requeue script, which
fails jobs that already streamed part of an answer and dead-letters jobs that used
their attempts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from corral import keys
from corral.connections import text
from corral.jobs import JobStore
from corral.streams import existing_streams

log = logging.getLogger(__name__)

BATCH = 500


async def known_models(redis: Redis) -> list[str]:
    return sorted(text(m) for m in await redis.smembers(keys.MODELS))


@dataclass
class Owners:
    """When each consumer was last seen alive, on Redis's clock.

    A registered node was seen at its last heartbeat; a consumer missing from the
    registry was last seen when this scheduler first noticed it missing (a live worker
    removed by hand registers again at its next heartbeat, well within a TTL).
    """

    node_ttl: float
    missing_since: dict[str, float] = field(default_factory=dict)

    async def overdue(
        self, redis: Redis, models: list[str], now: float
    ) -> list[tuple[Holding, str]]:
        """Every (stream, consumer) whose pending entries must be taken back now, and why."""
        scored: Any = await redis.zrange(keys.NODES, 0, -1, withscores=True)
        registry = {text(node): float(score) for node, score in scored}
        holdings = await pending_by_consumer(redis, models)
        holders = {h.consumer for h in holdings}
        for gone in set(self.missing_since) - holders:
            del self.missing_since[gone]  # holds nothing any more
        overdue: list[tuple[Holding, str]] = []
        for holding in holdings:
            seen = registry.get(holding.consumer)
            if seen is None:
                seen = self.missing_since.setdefault(holding.consumer, now)
                why = f"node {holding.consumer} left the registry while holding it"
            else:
                self.missing_since.pop(holding.consumer, None)
                why = f"node {holding.consumer} died"
            if now - seen > self.node_ttl:
                overdue.append((holding, why))
        return overdue


@dataclass(frozen=True, slots=True)
class Holding:
    """A consumer with entries pending in one priority stream."""

    model: str
    priority: int
    consumer: str
    pending: int


async def pending_by_consumer(redis: Redis, models: list[str]) -> list[Holding]:
    streams = await existing_streams(redis, models)
    if not streams:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for model, priority in streams:
            pipe.xinfo_consumers(keys.stream(model, priority), keys.GROUP)
        replies = await pipe.execute(raise_on_error=False)
    found: list[Holding] = []
    for (model, priority), consumers in zip(streams, replies, strict=True):
        if isinstance(consumers, Exception):
            continue  # the stream or its group went away meanwhile
        for consumer in consumers:
            pending = int(consumer.get("pending", 0))
            if pending:
                found.append(Holding(model, priority, text(consumer["name"]), pending))
    return found


async def dead_nodes(redis: Redis, node_ttl: float, now: float) -> list[str]:
    """Registered nodes whose last heartbeat is older than ``node_ttl``."""
    ids = await redis.zrangebyscore(keys.NODES, "-inf", now - node_ttl)
    return [text(i) for i in ids]


async def reclaim(store: JobStore, holding: Holding, reason: str, max_attempts: int) -> int:
    """Hand back every entry ``holding.consumer`` has pending in that stream."""
    redis = store.redis
    stream = keys.stream(holding.model, holding.priority)
    settled = 0
    while True:
        pending = await redis.xpending_range(
            stream, keys.GROUP, min="-", max="+", count=BATCH, consumername=holding.consumer
        )
        if not pending:
            return settled
        for item in pending:
            entry_id = text(item["message_id"])
            job_id = await _job_of(redis, stream, entry_id)
            outcome = await store.requeue(
                job_id,
                holding.model,
                holding.priority,
                entry_id,
                holding.consumer,
                reason,
                max_attempts=max_attempts,
            )
            settled += 1
            log.info("job %s from %s: %s", job_id, holding.consumer, _OUTCOMES[outcome])


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
