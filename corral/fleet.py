"""The node registry: worker heartbeats and the fleet view read from them.

A worker writes its whole state as one JSON record (``corral:node:<id>``, with a TTL)
and scores itself in the ``corral:nodes`` sorted set with the time. A node whose
heartbeat is older than ``node_ttl`` is dead: the gateway stops routing its models to
it and the scheduler takes back what it held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from corral import keys
from corral.connections import server_time, text
from corral.scripts import Function, Heartbeat, Touch, argv

NodeRecord = dict[str, Any]
"""Heartbeat fields: ``node_id``, ``hosts``, ``ollama_url``, ``state`` (running or
draining), ``models`` (``/api/tags`` entries), ``loaded`` (``/api/ps`` entries),
``slots_total``, ``slots_busy``, ``cpu_percent``, ``mem``, ``gpus``, ``started_at``, ``ts``;
placement: ``breaker`` (state and counts), ``weight``, ``backup``, ``load_costs``."""


SERVING_STATES = frozenset({"running", "breaker-open", "breaker-half-open"})
"""States of a node that serves its models: a node whose circuit breaker is open will
serve them again after its cool-down, so its models stay routable (their jobs queue)."""

LIVE_STATES = SERVING_STATES | {"draining", "ollama-down"}
"""States of a node whose worker is alive (up on /metrics, counted on the dashboard)."""


async def publish_heartbeat(redis: Redis, record: NodeRecord, ttl: float) -> float:
    """Write a node's record and registry score, stamped with Redis's time; returns it.

    The record lives for ``ttl`` seconds; liveness is judged by the score alone.
    """
    node_id = str(record["node_id"])
    body = orjson.dumps({k: v for k, v in record.items() if k != "ts"})
    written = await Function(redis, "heartbeat")(
        keys=[keys.node(node_id), keys.NODES],
        args=argv(Heartbeat(node_id=node_id, ttl_ms=int(ttl * 1000)), body),
    )
    return float(written)


async def touch(redis: Redis, registry: str, member: str) -> float:
    """Score ``member`` of a registry (live gateways) with Redis's time; returns it."""
    return float(await Function(redis, "touch")(keys=[registry], args=argv(Touch(member))))


async def remove_node(redis: Redis, node_id: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.node(node_id))
        pipe.zrem(keys.NODES, node_id)
        await pipe.execute()


@dataclass(slots=True)
class Fleet:
    """A snapshot of the live nodes and what they serve."""

    nodes: list[NodeRecord] = field(default_factory=list)
    taken_at: float = 0.0
    """Redis's time when the snapshot was read."""
    registered: frozenset[str] = frozenset()
    """Every node id in the registry, live or with a stale heartbeat (not yet removed)."""
    _served: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    def models(self) -> dict[str, NodeRecord]:
        """Each model served by a running node, with one node's ``/api/tags`` entry for it."""
        union: dict[str, NodeRecord] = {}
        for node in self.nodes:
            if node.get("state") not in SERVING_STATES:
                continue
            for entry in node.get("models", []):
                union.setdefault(str(entry.get("name") or entry.get("model")), entry)
        return union

    def has_model(self, model: str) -> bool:
        # Asked once per request: a set built once per snapshot, not a scan of every node.
        if self._served is None:
            self._served = frozenset(self.models())
        return model in self._served

    def loaded(self) -> list[NodeRecord]:
        """``/api/ps`` entries across nodes, each tagged with the node that has it."""
        out: list[NodeRecord] = []
        for node in self.nodes:
            out.extend({**entry, "node": node["node_id"]} for entry in node.get("loaded", []))
        return out


async def read_fleet(redis: Redis, node_ttl: float) -> Fleet:
    now = await server_time(redis)
    scored: Any = await redis.zrange(keys.NODES, 0, -1, withscores=True)
    registered = frozenset(text(node_id) for node_id, _ in scored)
    ids = [text(node_id) for node_id, seen in scored if float(seen) >= now - node_ttl]
    if not ids:
        return Fleet(taken_at=now, registered=registered)
    raw = await redis.mget([keys.node(i) for i in ids])
    nodes = [orjson.loads(item) for item in raw if item]
    nodes.sort(key=lambda n: str(n.get("node_id")))
    return Fleet(nodes=nodes, taken_at=now, registered=registered)
