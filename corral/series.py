"""The dashboard's graphs: per-second series read back from Redis and turned into lines.

The graphs are data: ``GRAPHS`` lists each one with a function that builds its lines from
the slots' fields (``corral.telemetry`` writes them). The browser dashboard and
``corral status --watch`` draw whatever comes back, so a new graph is one entry here.
The response cache's hit rate comes from the ``cache:hit``/``cache:miss`` events each
gateway ticks (``Recorder.tick``), the degradation level from the ``level:fleet`` gauge
the sampling gateway reads from the scheduler's load report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from corral import keys
from corral.connections import server_time, text
from corral.fleet import LIVE_STATES
from corral.snapshot import Snapshot
from corral.telemetry import LATENCY_BUCKETS, RETENTION, quantile

Slot = dict[str, float]
"""One slot's fields: counts for events, values for gauges."""

Lines = dict[str, list[float | None]]
"""Line name -> one value per slot (None: no data)."""

Builder = Callable[[list[Slot], int], Lines]
"""(slots, resolution in seconds) -> lines."""


@dataclass(frozen=True, slots=True)
class GraphSpec:
    id: str
    title: str
    unit: str
    build: Builder


def _suffixes(slots: Iterable[Slot], prefix: str) -> list[str]:
    return sorted(
        {name[len(prefix) :] for slot in slots for name in slot if name.startswith(prefix)}
    )


def rates(prefix: str) -> Builder:
    """One line per field ``<prefix><name>``: its count per second."""

    def build(slots: list[Slot], resolution: int) -> Lines:
        return {
            name: [slot.get(prefix + name, 0.0) / resolution for slot in slots]
            for name in _suffixes(slots, prefix)
        }

    return build


def gauges(prefix: str) -> Builder:
    """One line per gauge field ``<prefix><name>``; a slot without a sample has None."""

    def build(slots: list[Slot], resolution: int) -> Lines:
        return {
            name: [slot.get(prefix + name) for slot in slots] for name in _suffixes(slots, prefix)
        }

    return build


def ratio(numerator: str, denominators: Sequence[str], scale: float = 100.0) -> Builder:
    """One line: ``numerator`` over the sum of ``denominators``, times ``scale``."""

    def build(slots: list[Slot], resolution: int) -> Lines:
        values: list[float | None] = []
        for slot in slots:
            below = sum(slot.get(d, 0.0) for d in denominators)
            values.append(scale * slot.get(numerator, 0.0) / below if below else None)
        return {numerator.rsplit(":", maxsplit=1)[-1]: values}

    return build


def utilisation(busy: str, total: str) -> Builder:
    """Per node: ``<busy><node>`` over ``<total><node>``, in percent."""

    def build(slots: list[Slot], resolution: int) -> Lines:
        lines: Lines = {}
        for node in _suffixes(slots, total):
            values: list[float | None] = []
            for slot in slots:
                have = slot.get(total + node)
                values.append(100.0 * slot.get(busy + node, 0.0) / have if have else None)
            lines[node] = values
        return lines

    return build


def percentiles(series: str, window: int = 5, qs: Sequence[float] = (0.5, 0.95, 0.99)) -> Builder:
    """p50/p95/p99 of histogram ``series`` over the last ``window`` slots at each slot (one
    second holds few requests; a short window steadies the line)."""

    def build(slots: list[Slot], resolution: int) -> Lines:
        width = len(LATENCY_BUCKETS) + 1
        counts = [[slot.get(f"{series}:b{i}", 0.0) for i in range(width)] for slot in slots]
        span = window if resolution == 1 else 1
        lines: Lines = {f"p{round(q * 100)}": [] for q in qs}
        for index in range(len(slots)):
            merged = [
                sum(c[i] for c in counts[max(0, index - span + 1) : index + 1])
                for i in range(width)
            ]
            for q in qs:
                lines[f"p{round(q * 100)}"].append(quantile(LATENCY_BUCKETS, merged, q))
        return lines

    return build


GRAPHS: list[GraphSpec] = [
    GraphSpec("requests", "Requests/s by outcome", "req/s", rates("req:")),
    GraphSpec("queued", "Queue depth by priority", "jobs", gauges("queued:")),
    GraphSpec("wait", "Queue wait", "s", percentiles("wait")),
    GraphSpec("ttft", "Time to first token", "s", percentiles("ttft")),
    GraphSpec("total", "Total time", "s", percentiles("total")),
    GraphSpec("slots", "Slot utilisation per node", "%", utilisation("busy:", "slots:")),
    GraphSpec("tokens", "Tokens/s per node", "tok/s", rates("tok:")),
    GraphSpec("level", "Degradation level", "", gauges("level:")),
    GraphSpec("cache", "Cache hit rate", "%", ratio("cache:hit", ("cache:hit", "cache:miss"))),
]
"""The graphs, in the order the dashboard shows them (see the module's docstring)."""


def sample(snapshot: Snapshot) -> dict[str, float]:
    """Gauge fields of one second, from a fleet snapshot: what the graphs of state (not of
    events) draw."""
    fields: dict[str, float] = {}
    for queue in snapshot.queues:
        for stream in queue.streams:
            name = f"queued:p{stream.priority}"
            fields[name] = fields.get(name, 0.0) + stream.waiting
    for node in snapshot.nodes:
        if node.state not in LIVE_STATES:
            continue
        record = node.record
        fields[f"busy:{node.node_id}"] = float(record.get("slots_busy") or 0)
        fields[f"slots:{node.node_id}"] = float(record.get("slots_total") or 0)
    fields["nodes"] = float(sum(1 for n in snapshot.nodes if n.state in LIVE_STATES))
    fields["dead"] = float(snapshot.retries.dead_letters)
    fields["level:fleet"] = float(snapshot.load.level)
    return fields


async def read_slots(
    redis: Redis, resolution: int, span: float, now: float | None = None
) -> tuple[int, list[Slot]]:
    """The slots of the last ``span`` seconds at ``resolution`` (1 or 10), oldest first,
    ending with the last complete one before ``now`` (default: Redis's clock); returns
    (the first slot's start, slots)."""
    if resolution not in RETENTION:
        raise ValueError(f"resolution must be one of {sorted(RETENTION)}")
    count = max(1, min(int(span // resolution), RETENTION[resolution] // resolution))
    second = int(now if now is not None else await server_time(redis))
    last = second - second % resolution - resolution
    first = last - (count - 1) * resolution
    async with redis.pipeline(transaction=False) as pipe:
        for start in range(first, last + 1, resolution):
            pipe.hgetall(keys.series(resolution, start))
        replies = await pipe.execute()
    slots = [{text(k): float(v) for k, v in reply.items()} for reply in replies]
    return first, slots


def graphs(
    slots: list[Slot], resolution: int, specs: Sequence[GraphSpec] = GRAPHS
) -> list[dict[str, Any]]:
    """Every graph's lines, as JSON-ready dicts."""
    return [
        {
            "id": spec.id,
            "title": spec.title,
            "unit": spec.unit,
            "lines": [{"name": n, "values": v} for n, v in spec.build(slots, resolution).items()],
        }
        for spec in specs
    ]


async def read_graphs(redis: Redis, resolution: int, span: float) -> dict[str, Any]:
    first, slots = await read_slots(redis, resolution, span)
    return {"start": first, "step": resolution, "graphs": graphs(slots, resolution)}
