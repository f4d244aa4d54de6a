"""``corral status --once`` and ``--watch``: the fleet as rich tables, with the rates of
the last seconds from the per-second series (``corral.series``).

``--top`` sorts by what is busiest: nodes by busy slots, queues by jobs waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from corral import humanize
from corral.fleet import LIVE_STATES
from corral.series import Slot, graphs
from corral.snapshot import NodeStatus, QueueStatus, Snapshot

RATE_WINDOW = 10
"""Seconds of series the rates are averaged over."""

LEVEL = "level:fleet"
"""The series gauge of the degradation level (shown once a sampler writes it)."""


@dataclass(slots=True)
class Rates:
    """What the last ``RATE_WINDOW`` seconds looked like, fleet-wide."""

    requests: dict[str, float] = field(default_factory=dict)
    """Requests per second by outcome."""
    tokens: dict[str, float] = field(default_factory=dict)
    """Tokens per second by node."""
    latency: dict[str, float | None] = field(default_factory=dict)
    """``total p50``, ``total p95``, ``wait p95`` ... in seconds (None: no request)."""
    gauges: dict[str, float] = field(default_factory=dict)
    """The last sampled gauges (``level:fleet`` once degradation levels exist)."""


def rates(slots: list[Slot]) -> Rates:
    out = Rates()
    seen = len(slots) or 1
    for graph in graphs(slots, 1):
        lines = {line["name"]: line["values"] for line in graph["lines"]}
        if graph["id"] == "requests":
            out.requests = {name: sum(v) / seen for name, v in lines.items()}
        elif graph["id"] == "tokens":
            out.tokens = {name: sum(v) / seen for name, v in lines.items()}
        elif graph["id"] in ("wait", "total", "ttft"):
            for name, values in lines.items():
                last = next((v for v in reversed(values) if v is not None), None)
                out.latency[f"{graph['id']} {name}"] = last
    for slot in slots:
        out.gauges.update(slot)
    return out


def to_json(rates_: Rates) -> dict[str, Any]:
    return {
        "window_s": RATE_WINDOW,
        "requests_per_s": rates_.requests,
        "tokens_per_s": rates_.tokens,
        "latency_s": rates_.latency,
        "level": rates_.gauges.get(LEVEL),
    }


def empty_hint(snapshot: Snapshot) -> str:
    """Said when Redis holds no trace of Corral: most often the wrong Redis or database."""
    if snapshot.nodes or snapshot.queues or snapshot.stats:
        return ""
    return (
        f"{snapshot.redis_url} holds no Corral data: no node has sent a heartbeat and no "
        "job was ever queued. Is this the Redis (and database number) your gateway and "
        "workers use? Set CORRAL_REDIS_URL or --redis-url."
    )


def render(snapshot: Snapshot, rates_: Rates, *, top: bool = False) -> RenderableType:
    parts: list[RenderableType] = [_summary(snapshot, rates_)]
    hint = empty_hint(snapshot)
    if hint:
        parts.append(Text(hint, style="yellow"))
    parts += [_nodes(snapshot.nodes, top), _queues(snapshot.queues, top), _rates(rates_)]
    return Group(*parts)


def _summary(snapshot: Snapshot, rates_: Rates) -> Text:
    live = sum(1 for n in snapshot.nodes if n.state in LIVE_STATES)
    busy = sum(int(n.record.get("slots_busy") or 0) for n in snapshot.nodes)
    slots = sum(int(n.record.get("slots_total") or 0) for n in snapshot.nodes)
    queued = sum(q.queued for q in snapshot.queues)
    retries = snapshot.retries
    text = Text(f"corral status of {snapshot.redis_url}\n", style="bold")
    text.append(f"nodes {live}/{len(snapshot.nodes)} live  ")
    text.append(f"slots {busy}/{slots} busy  queued {queued}  ")
    text.append(f"retrying {retries.inbox + retries.scheduled}  ")
    text.append(
        f"dead letters {retries.dead_letters}  ",
        style="red" if retries.dead_letters else "",
    )
    text.append(f"gateways {snapshot.gateways}")
    level = rates_.gauges.get(LEVEL)
    if level is not None:
        text.append(f"  level {level:g}", style="red" if level else "")
    return text


def _nodes(nodes: list[NodeStatus], top: bool) -> RenderableType:
    table = Table(title="nodes", title_justify="left", expand=False)
    for column in ("node", "state", "slots", "loaded", "cpu", "memory", "gpu", "heartbeat"):
        table.add_column(column, justify="right" if column in ("slots", "cpu") else "left")
    ordered = sorted(nodes, key=lambda n: -int(n.record.get("slots_busy") or 0)) if top else nodes
    for node in ordered:
        rec = node.record
        live = node.state in LIVE_STATES
        table.add_row(
            node.node_id,
            Text(node.state, style="green" if node.state == "running" else "red"),
            f"{rec.get('slots_busy', '?')}/{rec.get('slots_total', '?')}",
            ", ".join(humanize.model_names(rec.get("loaded"))) or "-",
            humanize.percent(rec.get("cpu_percent")),
            humanize.memory(rec.get("mem")),
            humanize.gpus(rec.get("gpus")),
            Text(f"{node.heartbeat_age:.1f}s", style="" if live else "red"),
        )
    if not nodes:
        table.add_row("none: no worker has sent a heartbeat", *[""] * 7)
    return table


def _queues(queues: list[QueueStatus], top: bool) -> RenderableType:
    table = Table(title="queues", title_justify="left")
    for column in ("model", "priority", "queued", "running"):
        table.add_column(column, justify="left" if column == "model" else "right")
    ordered = sorted(queues, key=lambda q: -q.queued) if top else queues
    for queue in ordered:
        running = sum(s.pending for s in queue.streams)
        table.add_row(queue.model, "all", str(queue.queued), str(running))
        for stream in queue.streams:
            if stream.waiting or stream.pending:
                table.add_row("", f"p{stream.priority}", str(stream.waiting), str(stream.pending))
    if not queues:
        table.add_row("none: no job was ever queued", "", "", "")
    return table


def _rates(rates_: Rates) -> RenderableType:
    table = Table(title=f"last {RATE_WINDOW} s", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for outcome, value in sorted(rates_.requests.items()):
        table.add_row(f"requests/s {outcome}", f"{value:.2f}")
    for node, value in sorted(rates_.tokens.items()):
        table.add_row(f"tokens/s {node}", f"{value:.1f}")
    for name, seconds in rates_.latency.items():
        if name.endswith(("p50", "p95")):
            table.add_row(name, "-" if seconds is None else f"{seconds * 1000:.1f} ms")
    if not table.rows:
        table.add_row("no requests recorded", "")
    return table
