"""A fleet snapshot in Prometheus' text exposition format (version 0.0.4).

Every figure comes from Redis, so any gateway process answers for the whole fleet; the
only per-process figure is the gateway's own count of waiting requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from corral.snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Sample = tuple[Mapping[str, object], float]

LIVE_STATES = frozenset({"running", "draining", "ollama-down"})
"""Node states whose heartbeat is fresh (``stale`` and ``gone`` are the others)."""


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(snapshot: Snapshot, *, gateway_id: str, waiting: int) -> str:
    out = Exposition()
    out.add(
        "corral_job_events_total", "counter",
        "Job events since the counters were created (corral:stats).",
        (({"event": event}, value) for event, value in snapshot.stats.items()),
    )  # fmt: skip
    _queues(out, snapshot)
    _nodes(out, snapshot)
    out.add(
        "corral_retry_inbox_jobs", "gauge",
        "Failed attempts waiting for the scheduler to schedule their retry.",
        [({}, snapshot.retries.inbox)],
    )  # fmt: skip
    out.add(
        "corral_retry_scheduled_jobs", "gauge",
        "Retries scheduled in RQ, waiting for their backoff.",
        [({}, snapshot.retries.scheduled)],
    )  # fmt: skip
    out.add(
        "corral_dead_letter_jobs", "gauge",
        "Jobs in the dead-letter queue (RQ's failed registry of the retry queue).",
        [({}, snapshot.retries.dead_letters)],
    )  # fmt: skip
    out.add(
        "corral_gateways_live", "gauge",
        "Gateway processes that heartbeated within CORRAL_GATEWAY_TTL.",
        [({}, snapshot.gateways)],
    )  # fmt: skip
    out.add(
        "corral_gateway_waiting_requests", "gauge",
        "Requests this gateway process holds open, waiting for their job's answer.",
        [({"gateway": gateway_id}, waiting)],
    )  # fmt: skip
    return out.text()


def _queues(out: Exposition, snapshot: Snapshot) -> None:
    out.add(
        "corral_queued_jobs", "gauge", "Jobs enqueued and not yet claimed, per model.",
        (({"model": q.model}, q.queued) for q in snapshot.queues),
    )  # fmt: skip
    streams = [(q.model, s) for q in snapshot.queues for s in q.streams]
    out.add(
        "corral_stream_entries", "gauge",
        "Entries in each (model, priority) stream, acknowledged ones until trimmed.",
        (({"model": m, "priority": s.priority}, s.length) for m, s in streams),
    )  # fmt: skip
    out.add(
        "corral_running_jobs", "gauge",
        "Jobs claimed by a node and not yet settled, per (model, priority).",
        (({"model": m, "priority": s.priority}, s.pending) for m, s in streams),
    )  # fmt: skip


def _nodes(out: Exposition, snapshot: Snapshot) -> None:
    nodes = snapshot.nodes
    out.add(
        "corral_node_up", "gauge", "1 while the node heartbeats within CORRAL_NODE_TTL.",
        (({"node": n.node_id}, n.state in LIVE_STATES) for n in nodes),
    )  # fmt: skip
    out.add(
        "corral_node_info", "gauge", "The node's state, Ollama version and address (always 1).",
        (
            (
                {
                    "node": n.node_id,
                    "state": n.state,
                    "version": n.record.get("version", ""),
                    "ollama_url": n.record.get("ollama_url", ""),
                },
                1,
            )
            for n in nodes
        ),
    )  # fmt: skip
    out.add(
        "corral_node_heartbeat_age_seconds", "gauge", "Seconds since the node's last heartbeat.",
        (({"node": n.node_id}, n.heartbeat_age) for n in nodes),
    )  # fmt: skip
    records = [(n.node_id, n.record) for n in nodes if n.record]
    for name, field, help_text in (
        ("corral_node_slots", "slots_total", "The node's slots (OLLAMA_NUM_PARALLEL)."),
        ("corral_node_busy_slots", "slots_busy", "Slots running a job."),
        ("corral_node_cpu_percent", "cpu_percent", "Host CPU use, percent."),
    ):
        out.add(name, "gauge", help_text, _field(records, field))
    out.add(
        "corral_node_memory_percent", "gauge", "Host memory in use, percent.",
        (
            ({"node": node}, rec["mem"]["percent"])
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
        out.add(
            name, "gauge", help_text,
            (
                (_gpu_labels(node, gpu), gpu[field])
                for node, gpu in gpus
                if isinstance(gpu.get(field), int | float)
            ),
        )  # fmt: skip
    for name, field, help_text in (
        ("corral_node_model_available", "models", "1 for each model the node's Ollama has."),
        ("corral_node_model_loaded", "loaded", "1 for each model loaded in the node's memory."),
    ):
        out.add(
            name, "gauge", help_text,
            (
                ({"node": node, "model": entry.get("name") or entry.get("model") or ""}, 1)
                for node, rec in records
                for entry in rec.get(field) or []
                if isinstance(entry, dict)
            ),
        )  # fmt: skip


def _gpu_labels(node: str, gpu: dict[str, Any]) -> dict[str, object]:
    return {"node": node, "gpu": gpu.get("index", ""), "name": gpu.get("name", "")}


def _field(records: list[tuple[str, dict[str, Any]]], field: str) -> Iterable[Sample]:
    return (
        ({"node": node}, rec[field])
        for node, rec in records
        if isinstance(rec.get(field), int | float)
    )


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
