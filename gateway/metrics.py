"""The fleet's Prometheus metrics, built with prometheus-client from one snapshot.

Every figure comes from Redis, so any gateway process answers for the whole fleet; the
only per-process figure is the gateway's own count of waiting requests. The latency
histograms and request counters too are the fleet's: every gateway and worker adds its
figures to Redis about once a second (``corral.telemetry``), so a scrape of any gateway
shows all of them, at most a second or two late. Scrape one gateway (or take ``max``
across gateways), not ``sum``: each gateway exposes the same fleet-wide totals.

Each scrape builds its own registry around a collector over the snapshot taken for it,
so nothing is global. The library's default ``REGISTRY`` is never used: its process and
platform collectors would describe one gateway process, not the fleet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from corral.fleet import LIVE_STATES
from corral.snapshot import Snapshot
from corral.telemetry import METRICS, Histogram
from corral.telemetry import Metric as Recorded

Recordings = dict[str, dict[tuple[str, ...], Histogram | float]]

CONTENT_TYPE = CONTENT_TYPE_LATEST

Sample = tuple[Sequence[object], float]
"""Label values, in the order of the family's label names, and the value."""

"""Node states whose heartbeat is fresh (``stale`` and ``gone`` are the others)."""


def render(
    snapshot: Snapshot, *, gateway_id: str, waiting: int, recorded: Recordings | None = None
) -> bytes:
    """The text exposition of ``snapshot`` and the recorded histograms and counters
    (synchronous: the Redis reads are done)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        FleetCollector(snapshot, gateway_id=gateway_id, waiting=waiting, recorded=recorded)
    )
    return generate_latest(registry)


class FleetCollector(Collector):
    """A prometheus-client collector over one fleet snapshot (see README's metric table)."""

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        gateway_id: str,
        waiting: int,
        recorded: Recordings | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.gateway_id = gateway_id
        self.waiting = waiting
        self.recorded = recorded or {}

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        # The library names the family without `_total` and exposes its samples with it:
        # corral_job_events_total, the name dashboards know.
        events = CounterMetricFamily(
            "corral_job_events_total",
            "Job events since the counters were created (corral:stats).",
            labels=["event"],
        )
        for event, count in snapshot.stats.items():
            events.add_metric([event], count)
        yield events
        yield from _queues(snapshot)
        yield from _nodes(snapshot)
        retries = snapshot.retries
        yield GaugeMetricFamily(
            "corral_retry_inbox_jobs",
            "Failed attempts waiting for the scheduler to schedule their retry.",
            value=retries.inbox,
        )
        yield GaugeMetricFamily(
            "corral_retry_scheduled_jobs",
            "Retries scheduled in RQ, waiting for their backoff.",
            value=retries.scheduled,
        )
        yield GaugeMetricFamily(
            "corral_dead_letter_jobs",
            "Jobs in the dead-letter queue (RQ's failed registry of the retry queue).",
            value=retries.dead_letters,
        )
        yield from _load(snapshot)
        yield GaugeMetricFamily(
            "corral_gateways_live",
            "Gateway processes that heartbeated within CORRAL_GATEWAY_TTL.",
            value=snapshot.gateways,
        )
        yield _gauge(
            "corral_gateway_waiting_requests",
            "Requests this gateway process holds open, waiting for their job's answer.",
            ["gateway"],
            [([self.gateway_id], self.waiting)],
        )
        for short, metric in METRICS.items():
            yield _recorded(metric, self.recorded.get(short, {}))


def _recorded(metric: Recorded, values: dict[tuple[str, ...], Histogram | float]) -> Metric:
    labels = list(metric.labels)
    if not metric.histogram:
        counter = CounterMetricFamily(metric.name, metric.help, labels=labels)
        for label_values, value in sorted(values.items()):
            if not isinstance(value, Histogram):
                counter.add_metric(list(label_values), value)
        return counter
    family = HistogramMetricFamily(metric.name, metric.help, labels=labels)
    bounds = [*(f"{b:g}" for b in metric.buckets), "+Inf"]
    for label_values, hist in sorted(values.items()):
        if not isinstance(hist, Histogram):
            continue
        cumulative, running = [], 0.0
        for bound, count in zip(bounds, hist.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family.add_metric(list(label_values), cumulative, sum_value=hist.total)
    return family


def _gauge(
    name: str, help_text: str, labels: Sequence[str], samples: Iterable[Sample]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric([str(v) for v in values], float(value))
    return family


def _queues(snapshot: Snapshot) -> Iterator[Metric]:
    yield _gauge(
        "corral_queued_jobs", "Jobs enqueued and not yet claimed, per model.", ["model"],
        (([q.model], q.queued) for q in snapshot.queues),
    )  # fmt: skip
    streams = [(q.model, s) for q in snapshot.queues for s in q.streams]
    yield _gauge(
        "corral_stream_entries",
        "Entries in each (model, priority) stream, acknowledged ones until trimmed.",
        ["model", "priority"],
        (([m, s.priority], s.length) for m, s in streams),
    )  # fmt: skip
    yield _gauge(
        "corral_running_jobs",
        "Jobs claimed by a node and not yet settled, per (model, priority).",
        ["model", "priority"],
        (([m, s.priority], s.pending) for m, s in streams),
    )  # fmt: skip


def _nodes(snapshot: Snapshot) -> Iterator[Metric]:
    nodes = snapshot.nodes
    yield _gauge(
        "corral_node_up", "1 while the node heartbeats within CORRAL_NODE_TTL.", ["node"],
        (([n.node_id], n.state in LIVE_STATES) for n in nodes),
    )  # fmt: skip
    yield _gauge(
        "corral_node_info", "The node's state, Ollama version and address (always 1).",
        ["node", "state", "version", "ollama_url"],
        (
            (
                [
                    n.node_id,
                    n.state,
                    n.record.get("version", ""),
                    n.record.get("ollama_url", ""),
                ],
                1,
            )
            for n in nodes
        ),
    )  # fmt: skip
    yield _gauge(
        "corral_node_heartbeat_age_seconds", "Seconds since the node's last heartbeat.",
        ["node"], (([n.node_id], n.heartbeat_age) for n in nodes),
    )  # fmt: skip
    records = [(n.node_id, n.record) for n in nodes if n.record]
    yield _gauge(
        "corral_node_breaker_open",
        "1 while the node's circuit breaker is open or half-open (it claims no job, or one "
        "probe), 0 while closed.",
        ["node"],
        (
            ([node], (rec.get("breaker") or {}).get("state") != "closed")
            for node, rec in records
            if isinstance(rec.get("breaker"), dict)
        ),
    )
    for name, field, help_text in (
        ("corral_node_slots", "slots_total", "The node's slots (OLLAMA_NUM_PARALLEL)."),
        ("corral_node_busy_slots", "slots_busy", "Slots running a job."),
        ("corral_node_cpu_percent", "cpu_percent", "Host CPU use, percent."),
    ):
        yield _gauge(name, help_text, ["node"], _field(records, field))
    yield _gauge(
        "corral_node_memory_percent", "Host memory in use, percent.", ["node"],
        (
            ([node], rec["mem"]["percent"])
            for node, rec in records
            if isinstance(rec.get("mem"), dict) and "percent" in rec["mem"]
        ),
    )  # fmt: skip
    gpus = [
        (node, gpu)
        for node, rec in records
        for gpu in rec.get("gpus") or []
        if isinstance(gpu, dict)
    ]
    for name, field, help_text in (
        ("corral_node_gpu_utilization_percent", "util_percent", "GPU utilisation, percent."),
        ("corral_node_gpu_memory_used_bytes", "mem_used", "GPU memory in use."),
        ("corral_node_gpu_memory_total_bytes", "mem_total", "GPU memory in all."),
    ):
        yield _gauge(
            name, help_text, ["node", "gpu", "name"],
            (
                ([node, gpu.get("index", ""), gpu.get("name", "")], gpu[field])
                for node, gpu in gpus
                if isinstance(gpu.get(field), int | float)
            ),
        )  # fmt: skip
    for name, field, help_text in (
        ("corral_node_model_available", "models", "1 for each model the node's Ollama has."),
        ("corral_node_model_loaded", "loaded", "1 for each model loaded in the node's memory."),
    ):
        yield _gauge(
            name, help_text, ["node", "model"],
            (
                ([node, entry.get("name") or entry.get("model") or ""], 1)
                for node, rec in records
                for entry in rec.get(field) or []
                if isinstance(entry, dict)
            ),
        )  # fmt: skip


def _field(records: list[tuple[str, dict[str, Any]]], field: str) -> Iterator[Sample]:
    return (
        ([node], rec[field]) for node, rec in records if isinstance(rec.get(field), int | float)
    )


def _load(snapshot: Snapshot) -> Iterator[Metric]:
    load = snapshot.load
    yield GaugeMetricFamily(
        "corral_degradation_level",
        "The fleet's degradation level: 0 normal, 1 minor, 2 major, 3 critical.",
        value=load.level,
    )
    yield GaugeMetricFamily(
        "corral_load_ratio",
        "The load the level follows (1 = full), as the active scheduler last measured it.",
        value=load.load,
    )
    yield GaugeMetricFamily(
        "corral_expected_queue_wait_seconds",
        "Expected queue wait of the most backlogged model, from its measured drain rate.",
        value=load.wait,
    )
    yield _gauge(
        "corral_drain_rate_jobs_per_second",
        "Jobs per second each model's queue drained while it had a backlog.",
        ["model"],
        (([model], figures.rate) for model, figures in sorted(load.models.items())),
    )
