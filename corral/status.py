"""``corral status``: what the fleet looks like in Redis, read directly (no gateway needed).

Shows every registered node from its heartbeat record, every model's priority streams
with their length and pending (claimed, not yet acknowledged) entries, and the
fleet-wide counters. Works on an empty Redis (and says it may be the wrong one), and
prints JSON with ``--json``. ``--once`` shows the same as tables with the last seconds'
rates and latencies, ``--watch`` keeps that view refreshing, ``--top`` sorts it by what
is busiest (``corral.status_view``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import asdict
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from corral import humanize, series, status_view
from corral.load import LoadReport
from corral.settings import CommonSettings
from corral.snapshot import NodeStatus, QueueStatus, RetryStatus, Snapshot, take_snapshot
from corral.status_view import Rates

# ------------------------------------------------------------------------- rendering


def render(snapshot: Snapshot) -> str:
    lines = [f"corral status of {snapshot.redis_url}", ""]
    lines += render_nodes(snapshot.nodes)
    lines += ["", *render_queues(snapshot.queues)]
    lines += ["", *render_stats(snapshot.stats)]
    lines += ["", render_retries(snapshot.retries), f"GATEWAYS  {snapshot.gateways} live"]
    lines += ["", *render_load(snapshot.load)]
    hint = status_view.empty_hint(snapshot)
    if hint:
        lines += ["", hint]
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
        snapshot, _ = await _read_with(client, settings, rates=False)
        return snapshot
    finally:
        await client.aclose()


async def _read_with(
    client: Redis, settings: CommonSettings, *, rates: bool = True
) -> tuple[Snapshot, Rates]:
    snapshot = await take_snapshot(
        client,
        settings.redis_url,
        node_ttl=settings.node_ttl,
        gateway_ttl=settings.gateway_ttl,
    )
    if not rates:
        return snapshot, Rates()
    _, slots = await series.read_slots(client, 1, status_view.RATE_WINDOW)
    return snapshot, status_view.rates(slots)


async def _json(settings: CommonSettings) -> dict[str, Any]:
    client = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        snapshot, rates = await _read_with(client, settings)
    finally:
        await client.aclose()
    body: dict[str, Any] = {**asdict(snapshot), "rates": status_view.to_json(rates)}
    hint = status_view.empty_hint(snapshot)
    if hint:
        body["hint"] = hint
    return body


async def _view(settings: CommonSettings, *, watch: float, top: bool) -> None:
    """Print the tables once, or keep them refreshing every ``watch`` seconds (Ctrl-C ends)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    client = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        snapshot, rates = await _read_with(client, settings)
        view = status_view.render(snapshot, rates, top=top)
        if not watch:
            console.print(view)
            return
        with Live(view, console=console, auto_refresh=False, screen=False) as live:
            while True:
                await asyncio.sleep(watch)  # the refresh period itself, not a synchronisation
                try:
                    snapshot, rates = await _read_with(client, settings)
                    live.update(status_view.render(snapshot, rates, top=top), refresh=True)
                except RedisError as exc:  # keep watching: Redis may come back
                    live.update(f"cannot read {settings.redis_url}: {exc}", refresh=True)
    finally:
        await client.aclose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral status", description=__doc__)
    default = CommonSettings.model_fields["redis_url"].default
    parser.add_argument(
        "--redis-url", default=None, help=f"Redis to read (env CORRAL_REDIS_URL, default {default})"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--json", action="store_true", help="print the snapshot and the rates as JSON"
    )
    mode.add_argument(
        "--once", action="store_true", help="print the tables (with rates and latencies) once"
    )
    mode.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=float,
        metavar="SECONDS",
        help="keep the tables refreshing (every 2 s unless given); Ctrl-C ends",
    )
    parser.add_argument("--top", action="store_true", help="sort by what is busiest")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # The environment supplies the node TTL (and the URL when no flag gives one).
    settings = CommonSettings.build(**({"redis_url": args.redis_url} if args.redis_url else {}))
    if args.watch is not None and args.watch <= 0:
        print("corral status: --watch takes a period above 0 seconds", file=sys.stderr)
        return 2
    try:
        if args.json:
            body = asyncio.run(_json(settings))
            sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        elif args.once or args.watch:
            asyncio.run(_view(settings, watch=args.watch or 0.0, top=args.top))
        else:
            print(render(asyncio.run(_read(settings))))
    except RedisError as exc:
        print(f"corral status: cannot read {settings.redis_url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
