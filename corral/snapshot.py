"""One read of the whole fleet's state from Redis, for ``corral status``, the gateway's
status page and its Prometheus metrics.

Three pipelined round trips whatever the size of the fleet: the registry, counters and
retry figures; which streams exist; every node record, queued counter and existing
stream's length and pending summary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from rq.registry import FailedJobRegistry

from corral import keys
from corral.connections import server_time, text
from corral.load import NO_LOAD, LoadReport
from corral.streams import existing_streams


@dataclass(slots=True)
class NodeStatus:
    node_id: str
    state: str
    """The worker's own state, or ``stale`` (heartbeat older than the node TTL) or
    ``gone`` (registered, but its record expired)."""
    heartbeat_age: float
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class StreamStatus:
    priority: int
    length: int
    pending: int
    """Entries handed to a worker and not yet acknowledged: jobs running."""
    waiting: int = 0
    """Entries not yet handed to any worker (the group's lag): jobs queued."""


@dataclass(slots=True)
class QueueStatus:
    model: str
    queued: int
    """The model's queued counter: jobs enqueued and not yet claimed."""
    streams: list[StreamStatus] = field(default_factory=list)


@dataclass(slots=True)
class RetryStatus:
    inbox: int
    """Failed attempts waiting for the scheduler to schedule their retry."""
    scheduled: int
    """Retries scheduled in RQ, waiting for their backoff."""
    dead_letters: int
    """Jobs in RQ's failed registry for the retry queue (the dead-letter queue)."""


@dataclass(slots=True)
class Snapshot:
    redis_url: str
    taken_at: float
    nodes: list[NodeStatus]
    queues: list[QueueStatus]
    stats: dict[str, int]
    retries: RetryStatus
    gateways: int
    """Gateways that heartbeated within the gateway TTL."""
    load: LoadReport = NO_LOAD
    """The active scheduler's load report: degradation level and drain rates."""


@functools.cache
def dead_letter_key() -> str:
    """The Redis key of RQ's failed registry for the retry queue (RQ's own naming)."""
    # The registry only names its key here; the client it is given never connects.
    registry = FailedJobRegistry(keys.RETRY_QUEUE, connection=SyncRedis())
    return str(registry.key)


async def take_snapshot(
    client: Redis, redis_url: str, *, node_ttl: float, gateway_ttl: float
) -> Snapshot:
    now = await server_time(client)  # heartbeats are stamped with Redis's clock
    async with client.pipeline(transaction=False) as pipe:
        pipe.zrange(keys.NODES, 0, -1, withscores=True)
        pipe.smembers(keys.MODELS)
        pipe.hgetall(keys.STATS)
        pipe.llen(keys.RETRY_INBOX)
        pipe.zcard(keys.RETRY_SCHEDULED)
        pipe.zcard(dead_letter_key())
        pipe.zcount(keys.GATEWAYS, now - gateway_ttl, "+inf")
        pipe.get(keys.LOAD)
        registry, members, stats, inbox, scheduled, dead, gateways, load = await pipe.execute()
    scored = {text(node_id): float(score) for node_id, score in registry}
    node_ids = sorted(scored)
    models = sorted(text(m) for m in members)
    present = await existing_streams(client, models)
    async with client.pipeline(transaction=False) as pipe:
        for node_id in node_ids:
            pipe.get(keys.node(node_id))
        for model in models:
            pipe.get(keys.queued_count(model))
        for model, priority in present:
            pipe.xlen(keys.stream(model, priority))
            pipe.xpending(keys.stream(model, priority), keys.GROUP)
            pipe.xinfo_groups(keys.stream(model, priority))
        replies = iter(await pipe.execute(raise_on_error=False))
    blobs = [_value(next(replies)) for _ in node_ids]
    counts = [_value(next(replies)) for _ in models]
    nodes = [
        node_status(i, scored[i], blob, now, node_ttl)
        for i, blob in zip(node_ids, blobs, strict=True)
    ]
    queues = {
        model: QueueStatus(model, int(count or 0))
        for model, count in zip(models, counts, strict=True)
    }
    for model, priority in present:
        length, summary = _value(next(replies)), next(replies)  # XPENDING may fail: no group
        pending = int(summary.get("pending", 0)) if isinstance(summary, dict) else 0
        waiting = _lag(next(replies))
        queues[model].streams.append(StreamStatus(priority, int(length), pending, waiting))
    return Snapshot(
        redis_url=redis_url,
        taken_at=now,
        nodes=nodes,
        queues=list(queues.values()),
        stats=dict(sorted((text(k), int(v)) for k, v in stats.items())),
        retries=RetryStatus(int(inbox), int(scheduled), int(dead)),
        gateways=int(gateways),
        load=LoadReport.decode(load),
    )


def _lag(groups: Any) -> int:
    """Corral's group's lag from ``XINFO GROUPS`` (0 when the stream or group is missing,
    or the lag is unknown after a deletion inside the stream)."""
    if not isinstance(groups, list):
        return 0
    for group in groups:
        if isinstance(group, dict) and text(group.get("name", b"")) == keys.GROUP:
            try:
                return int(group.get("lag") or 0)
            except (TypeError, ValueError):
                return 0
    return 0


def _value(reply: Any) -> Any:
    """A pipelined reply, raising the error it may be (only XPENDING's are expected)."""
    if isinstance(reply, Exception):
        raise reply
    return reply


def node_status(node_id: str, seen: float, blob: Any, now: float, node_ttl: float) -> NodeStatus:
    record: dict[str, Any] = orjson.loads(blob) if isinstance(blob, bytes | str) else {}
    age = now - float(record.get("ts", seen))
    if not record:
        state = "gone"
    elif age > node_ttl:
        state = "stale"
    else:
        state = str(record.get("state", "?"))
    return NodeStatus(node_id, state, age, record)
