"""``corral status``: what the fleet looks like in Redis, read directly (no gateway needed).

Shows every registered node from its heartbeat record, every model's priority streams
with their length and pending (claimed, not yet acknowledged) entries, and the
fleet-wide counters. Works on an empty Redis, and prints JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import asdict

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from corral import humanize
from corral.load import LoadReport
from corral.settings import CommonSettings
from corral.snapshot import NodeStatus, QueueStatus, RetryStatus, Snapshot, take_snapshot

# ------------------------------------------------------------------------- rendering


def render(snapshot: Snapshot) -> str:
    lines = [f"corral status of {snapshot.redis_url}", ""]
    lines += render_nodes(snapshot.nodes)
    lines += ["", *render_queues(snapshot.queues)]
    lines += ["", *render_stats(snapshot.stats)]
    lines += ["", render_retries(snapshot.retries), f"GATEWAYS  {snapshot.gateways} live"]
    lines += ["", *render_load(snapshot.load)]
    return "\n".join(lines)


def render_load(load: LoadReport) -> list[str]:
    if not load.at:
        return ["LEVEL  0 (normal): no load report (no active scheduler, or it expired)"]
    lines = [
        f"LEVEL  {load.level} ({load.name})  load {load.load:.2f}  "
        f"occupancy {load.occupancy:.2f} ({load.queued} queued + {load.running} running, "
        f"{load.slots} slots)  expected wait {load.wait:.1f}s  drain {load.rate:.2f} jobs/s"
    ]
    for model, figures in sorted(load.models.items()):
        lines.append(f"  {model:<28} drain {figures.rate:.2f} jobs/s  queued {figures.ahead[-1]}")
    return lines


def render_nodes(nodes: list[NodeStatus]) -> list[str]:
    if not nodes:
        return ["NODES  none: no worker has sent a heartbeat"]
    lines = [f"NODES  {len(nodes)}"]
    for node in nodes:
        rec = node.record
        lines.append(
            f"  {node.node_id:<14} {node.state:<9} "
            f"slots {rec.get('slots_busy', '?')}/{rec.get('slots_total', '?')}  "
            f"cpu {humanize.percent(rec.get('cpu_percent'))}  "
            f"mem {humanize.memory(rec.get('mem'))}  "
            f"gpu {humanize.gpus(rec.get('gpus'))}  heartbeat {node.heartbeat_age:.1f}s ago"
        )
        lines.append(f"    models  {', '.join(humanize.model_names(rec.get('models'))) or '-'}")
        lines.append(f"    loaded  {', '.join(humanize.model_names(rec.get('loaded'))) or '-'}")
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


def render_retries(retries: RetryStatus) -> str:
    return (
        f"RETRIES  inbox {retries.inbox}  scheduled {retries.scheduled}  "
        f"dead letters {retries.dead_letters}"
    )


# ------------------------------------------------------------------------------ main


async def _read(settings: CommonSettings) -> Snapshot:
    client = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        return await take_snapshot(
            client,
            settings.redis_url,
            node_ttl=settings.node_ttl,
            gateway_ttl=settings.gateway_ttl,
        )
    finally:
        await client.aclose()


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
    # The environment supplies the node TTL (and the URL when no flag gives one).
    settings = CommonSettings.build(**({"redis_url": args.redis_url} if args.redis_url else {}))
    try:
        snapshot = asyncio.run(_read(settings))
    except RedisError as exc:
        print(f"corral status: cannot read {settings.redis_url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(asdict(snapshot), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(snapshot))
    return 0
