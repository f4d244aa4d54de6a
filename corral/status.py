"""``corral status``: what the fleet looks like in Redis, read directly (no gateway needed).

Shows every registered node from its heartbeat record, every model's priority streams
with their length and pending (claimed, not yet acknowledged) entries, and the
fleet-wide counters. Works on an empty Redis, and prints JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis
from redis.exceptions import RedisError, ResponseError

from corral import keys
from corral.settings import CommonSettings

GIB = 1024**3


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


@dataclass(slots=True)
class QueueStatus:
    model: str
    queued: int
    """The model's queued counter: jobs enqueued and not yet claimed."""
    streams: list[StreamStatus] = field(default_factory=list)


@dataclass(slots=True)
class Snapshot:
    redis_url: str
    taken_at: float
    nodes: list[NodeStatus]
    queues: list[QueueStatus]
    stats: dict[str, int]


# --------------------------------------------------------------------------- reading


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_nodes(client: redis.Redis, now: float, node_ttl: float) -> list[NodeStatus]:
    """Every node in the registry, live or not: a dead one is worth seeing here."""
    # Scores are the last heartbeat's time, for nodes whose record has already expired.
    entries: Any = client.zrange(keys.NODES, 0, -1, withscores=True)
    scored = {_text(node_id): float(score) for node_id, score in entries}
    if not scored:
        return []
    ids = sorted(scored)
    blobs = client.mget([keys.node(i) for i in ids])
    return [
        node_status(i, scored[i], blob, now, node_ttl) for i, blob in zip(ids, blobs, strict=True)
    ]


def node_status(
    node_id: str, seen: float, blob: bytes | str | None, now: float, node_ttl: float
) -> NodeStatus:
    record: dict[str, Any] = orjson.loads(blob) if blob else {}
    age = now - float(record.get("ts", seen))
    if not record:
        state = "gone"
    elif age > node_ttl:
        state = "stale"
    else:
        state = str(record.get("state", "?"))
    return NodeStatus(node_id, state, age, record)


def read_queues(client: redis.Redis) -> list[QueueStatus]:
    models = sorted(_text(m) for m in client.smembers(keys.MODELS))
    return [read_queue(client, model) for model in models]


def read_queue(client: redis.Redis, model: str) -> QueueStatus:
    queued = int(client.get(keys.queued_count(model)) or 0)
    queue = QueueStatus(model, queued)
    for priority in keys.PRIORITIES:
        stream = keys.stream(model, priority)
        length = int(client.xlen(stream))
        if length or client.exists(stream):
            queue.streams.append(StreamStatus(priority, length, pending_count(client, stream)))
    return queue


def pending_count(client: redis.Redis, stream: str) -> int:
    """Entries handed to a worker and not yet acknowledged (the XPENDING summary)."""
    try:
        summary = client.xpending(stream, keys.GROUP)
    except ResponseError:  # NOGROUP: the stream exists but no job was ever queued on it
        return 0
    return int(summary.get("pending", 0)) if isinstance(summary, dict) else 0


def read_stats(client: redis.Redis) -> dict[str, int]:
    raw = client.hgetall(keys.STATS)
    return dict(sorted((_text(k), int(v)) for k, v in raw.items()))


def take_snapshot(client: redis.Redis, redis_url: str, node_ttl: float) -> Snapshot:
    now = time.time()
    return Snapshot(
        redis_url=redis_url,
        taken_at=now,
        nodes=read_nodes(client, now, node_ttl),
        queues=read_queues(client),
        stats=read_stats(client),
    )


# ------------------------------------------------------------------------- rendering


def render(snapshot: Snapshot) -> str:
    lines = [f"corral status of {snapshot.redis_url}", ""]
    lines += render_nodes(snapshot.nodes)
    lines += ["", *render_queues(snapshot.queues)]
    lines += ["", *render_stats(snapshot.stats)]
    return "\n".join(lines)


def render_nodes(nodes: list[NodeStatus]) -> list[str]:
    if not nodes:
        return ["NODES  none: no worker has sent a heartbeat"]
    lines = [f"NODES  {len(nodes)}"]
    for node in nodes:
        rec = node.record
        lines.append(
            f"  {node.node_id:<14} {node.state:<9} "
            f"slots {rec.get('slots_busy', '?')}/{rec.get('slots_total', '?')}  "
            f"cpu {_percent(rec.get('cpu_percent'))}  mem {_memory(rec.get('mem'))}  "
            f"gpu {_gpus(rec.get('gpus'))}  heartbeat {node.heartbeat_age:.1f}s ago"
        )
        lines.append(f"    models  {_names(rec.get('models')) or '-'}")
        lines.append(f"    loaded  {_names(rec.get('loaded')) or '-'}")
    return lines


def render_queues(queues: list[QueueStatus]) -> list[str]:
    if not queues:
        return ["QUEUES  none: no job was ever queued"]
    lines = ["QUEUES  (length: entries in the stream; pending: claimed, not yet acknowledged)"]
    for queue in queues:
        lines.append(f"  {queue.model:<28} queued {queue.queued}")
        for stream in queue.streams:
            lines.append(
                f"    priority {stream.priority}  "
                f"length {stream.length:<6} pending {stream.pending}"
            )
    return lines


def render_stats(stats: dict[str, int]) -> list[str]:
    if not stats:
        return ["COUNTERS  none yet"]
    return ["COUNTERS  " + "  ".join(f"{name} {value}" for name, value in stats.items())]


def _names(entries: Any) -> str:
    if not isinstance(entries, list):
        return ""
    return ", ".join(str(e.get("name") or e.get("model")) for e in entries if isinstance(e, dict))


def _percent(value: Any) -> str:
    return f"{float(value):.0f}%" if isinstance(value, int | float) else "-"


def _memory(mem: Any) -> str:
    if not isinstance(mem, dict) or "percent" not in mem:
        return "-"
    return f"{_percent(mem['percent'])} of {float(mem.get('total', 0)) / GIB:.1f} GiB"


def _gpus(gpus: Any) -> str:
    if not isinstance(gpus, list) or not gpus:
        return "-"
    return ", ".join(
        f"{g.get('name', '?')} {_percent(g.get('util_percent'))} "
        f"{float(g.get('mem_used', 0)) / GIB:.1f}/{float(g.get('mem_total', 0)) / GIB:.1f} GiB"
        for g in gpus
        if isinstance(g, dict)
    )


# ------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral status", description=__doc__)
    default = CommonSettings.model_fields["redis_url"].default
    parser.add_argument(
        "--redis-url", default=None, help=f"Redis to read (env CORRAL_REDIS_URL, default {default})"
    )
    parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        # The environment supplies the node TTL (and the URL when no flag gives one).
        settings = CommonSettings(**({"redis_url": args.redis_url} if args.redis_url else {}))
    except ValueError as exc:
        print(f"corral status: invalid setting: {exc}", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        snapshot = take_snapshot(client, settings.redis_url, settings.node_ttl)
    except RedisError as exc:
        print(f"corral status: cannot read {settings.redis_url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        sys.stdout.write(orjson.dumps(asdict(snapshot), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(snapshot))
    return 0
