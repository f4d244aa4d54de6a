"""Latency histograms, counters and per-second series, recorded in memory and written to
Redis in one pipelined round trip per flush (issue 14).

The hot path only touches a dict: ``Recorder.observe`` and ``Recorder.count`` add to
in-memory totals, and a background loop of each process (the gateway's and the worker's
``telemetry`` loop) calls ``flush`` about once a second. So a request pays no Redis round
trip for its metrics, and Redis holds the fleet's figures summed over every gateway and
worker: any gateway's ``/metrics`` and ``/status`` show the whole fleet.

What lives in Redis:

* ``corral:metric:<name>`` (hash), one per metric in ``METRICS``: cumulative counts since
  the hash was created. A histogram's fields are ``[label values..., "b<i>"]`` (the count
  in bucket i, not cumulative), ``[..., "sum"]`` and ``[..., "count"]``, each JSON-encoded;
  a counter's field is its label values. Bounded by the labels' cardinality.
* ``corral:ts:1:<second>`` and ``corral:ts:10:<second>`` (hashes): what happened in that
  second (or ten seconds), fleet-wide, for the dashboard's graphs, kept ``RETENTION``
  seconds. Fields are ``series`` names of ``METRICS`` with a suffix (``req:done``,
  ``total:b7``, ``tok:node-1``) or gauges a sampler sets (``queued:p5``, ``busy:node-1``).

Seconds are Redis's clock: each flush reads ``TIME`` and the recorder keeps the offset of
its host's clock, so events from every host land in the same second.

A flush that fails (Redis down, ``OOM``) keeps its figures and adds them to the next one:
nothing is lost while memory stays bounded (labels are bounded, and seconds older than the
short retention are dropped). A flush whose reply is lost after Redis applied it (a
timeout, a dropped connection) may count some figures twice: metrics, unlike jobs,
accept that.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis

from corral import keys

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Upper bounds in seconds; LLM answers take from milliseconds (embeddings, a cached
model) to minutes (a cold load and a long generation)."""

RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
"""Tokens per second of one generation."""

RETENTION = {1: 300, 10: 3600}
"""Seconds each series resolution is kept: five minutes at 1 s, an hour at 10 s."""


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric recorded in Redis and exposed on ``/metrics``."""

    name: str
    """The Prometheus name (a counter's without ``_total``: the exposition adds it)."""
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    """Upper bounds of a histogram; empty for a counter."""
    series: str = ""
    """Prefix of its per-second series fields; empty for none."""
    series_label: str = ""
    """The label whose value suffixes a counter's series field (``req:done``)."""

    @property
    def histogram(self) -> bool:
        return bool(self.buckets)


_JOB_LABELS = ("model", "priority", "dialect", "outcome")

METRICS: dict[str, Metric] = {
    metric.series or metric.name: metric
    for metric in (
        Metric(
            "corral_queue_wait_seconds",
            "Time from enqueue to a node claiming the job (Redis clock), by model and priority.",
            ("model", "priority"),
            LATENCY_BUCKETS,
            series="wait",
        ),
        Metric(
            "corral_time_to_first_token_seconds",
            "Time from a request's enqueue to its first reply reaching the gateway.",
            _JOB_LABELS,
            LATENCY_BUCKETS,
            series="ttft",
        ),
        Metric(
            "corral_request_duration_seconds",
            "Time from a request's enqueue to its answer's end at the gateway.",
            _JOB_LABELS,
            LATENCY_BUCKETS,
            series="total",
        ),
        Metric(
            "corral_requests",
            "Job requests answered by a gateway, by outcome (done, error, timeout, "
            "disconnected, rejected).",
            _JOB_LABELS,
            series="req",
            series_label="outcome",
        ),
        Metric(
            "corral_generation_tokens_per_second",
            "Generation speed of each finished generation (Ollama's eval_count/eval_duration).",
            ("node", "model"),
            RATE_BUCKETS,
        ),
        Metric(
            "corral_generated_tokens",
            "Tokens generated, by node and model.",
            ("node", "model"),
            series="tok",
            series_label="node",
        ),
    )
}
"""Every recorded metric by its short name. A new one (the response cache's hits and
misses, say) is one entry here and one ``Recorder.count`` call where it happens."""


def bucket_index(buckets: Sequence[float], value: float) -> int:
    """The first bucket whose upper bound holds ``value`` (``len(buckets)``: +Inf)."""
    return bisect.bisect_left(buckets, value)


def field_name(values: Sequence[str]) -> bytes:
    """The Redis hash field of one label set (and bucket): a JSON list."""
    return orjson.dumps(list(values))


@dataclass(slots=True)
class _Pending:
    """Figures recorded since the last successful flush."""

    metrics: dict[str, dict[tuple[str, ...], float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    series: dict[int, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    gauges: dict[int, dict[str, float]] = field(default_factory=dict)

    def merge(self, later: _Pending) -> None:
        for name, fields in later.metrics.items():
            for key, value in fields.items():
                self.metrics[name][key] += value
        for second, counts in later.series.items():
            for name, count in counts.items():
                self.series[second][name] += count
        self.gauges.update(later.gauges)

    def empty(self) -> bool:
        return not (self.metrics or self.series or self.gauges)


class Recorder:
    """In-memory figures of one process, written to Redis by ``flush``.

    Not thread-safe: used from one event loop. ``clock`` is this host's clock; the offset
    to Redis's is measured at every flush."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.offset = 0.0
        self._pending = _Pending()

    def second(self) -> int:
        return int(self.clock() + self.offset)

    def observe(self, short: str, labels: Sequence[str], value: float) -> None:
        """Add ``value`` to histogram ``short`` (a key of ``METRICS``) under ``labels``."""
        # Plain tuples here, JSON only at the flush: this runs once per request.
        metric = METRICS[short]
        index = bucket_index(metric.buckets, value)
        fields = self._pending.metrics[short]
        fields[(*labels, f"b{index}")] += 1
        fields[(*labels, "sum")] += value
        fields[(*labels, "count")] += 1
        if metric.series:
            self._pending.series[self.second()][f"{metric.series}:b{index}"] += 1

    def count(self, short: str, labels: Sequence[str], amount: float = 1) -> None:
        """Add ``amount`` to counter ``short`` under ``labels``."""
        metric = METRICS[short]
        self._pending.metrics[short][tuple(labels)] += amount
        if metric.series:
            suffix = labels[metric.labels.index(metric.series_label)]
            self._pending.series[self.second()][f"{metric.series}:{suffix}"] += amount

    def tick(self, field: str, amount: float = 1) -> None:
        """Count an event in this second's series only: a graph's line, no metric of its
        own (the response cache's outcomes, which ``/metrics`` has per process)."""
        self._pending.series[self.second()][field] += amount

    def gauges(self, values: dict[str, float]) -> None:
        """Set per-second gauge fields (``queued:p5``) for the current second."""
        self._pending.gauges[self.second()] = values

    async def flush(self, redis: Redis) -> None:
        """Write everything recorded since the last flush in one pipeline, with Redis's
        ``TIME`` read in the same round trip; on failure keep it for the next flush.

        Not a MULTI: the keys span hash slots, and Redis Cluster refuses a transaction
        across slots."""
        pending, self._pending = self._pending, _Pending()
        oldest = self.second() - RETENTION[1]
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for short, fields in pending.metrics.items():
                    encoded = {field_name(names): value for names, value in fields.items()}
                    _write_fields(pipe, keys.metric(METRICS[short].name), encoded)
                for resolution, ttl in RETENTION.items():
                    touched: set[str] = set()
                    for second, counts in pending.series.items():
                        if second < oldest:
                            continue
                        key = keys.series(resolution, second - second % resolution)
                        _write_fields(pipe, key, counts)
                        touched.add(key)
                    for second, values in pending.gauges.items():
                        key = keys.series(resolution, second - second % resolution)
                        if values:
                            pipe.hset(key, mapping=values)  # type: ignore[arg-type]
                            touched.add(key)
                    for key in touched:
                        pipe.expire(key, ttl + resolution)
                pipe.time()
                replies = await pipe.execute()
        except BaseException:
            pending.merge(self._pending)
            self._pending = pending
            self._drop_old()
            raise
        seconds, micros = replies[-1]
        self.offset = float(seconds) + float(micros) / 1e6 - self.clock()

    def _drop_old(self) -> None:
        """Keep only seconds the short series still shows: a long outage bounds memory."""
        oldest = self.second() - RETENTION[1]
        for second in [s for s in self._pending.series if s < oldest]:
            del self._pending.series[second]
        for second in [s for s in self._pending.gauges if s < oldest]:
            del self._pending.gauges[second]


def _write_fields(pipe: object, key: str, fields: dict[bytes, float] | dict[str, float]) -> None:
    for name, value in fields.items():
        if value == int(value):
            pipe.hincrby(key, name, int(value))  # type: ignore[attr-defined]
        else:
            pipe.hincrbyfloat(key, name, value)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- reading


@dataclass(slots=True)
class Histogram:
    """One label set's histogram, read back from Redis."""

    counts: list[float]
    """Per bucket (not cumulative), the last one +Inf."""
    total: float = 0.0
    count: float = 0.0


async def read_metrics(redis: Redis) -> dict[str, dict[tuple[str, ...], Histogram | float]]:
    """Every metric's values by label values: a ``Histogram`` or a counter's float."""
    async with redis.pipeline(transaction=False) as pipe:
        for metric in METRICS.values():
            pipe.hgetall(keys.metric(metric.name))
        replies = await pipe.execute()
    out: dict[str, dict[tuple[str, ...], Histogram | float]] = {}
    for (short, metric), raw in zip(METRICS.items(), replies, strict=True):
        out[short] = _parse(metric, raw)
    return out


def _parse(metric: Metric, raw: dict[bytes, bytes]) -> dict[tuple[str, ...], Histogram | float]:
    values: dict[tuple[str, ...], Histogram | float] = {}
    width = len(metric.labels)
    for name, value in raw.items():
        parts = orjson.loads(name)
        number = float(value)
        if not metric.histogram:
            values[tuple(str(p) for p in parts)] = number
            continue
        labels, suffix = tuple(str(p) for p in parts[:width]), str(parts[width])
        hist = values.setdefault(labels, Histogram([0.0] * (len(metric.buckets) + 1)))
        assert isinstance(hist, Histogram)
        if suffix == "sum":
            hist.total = number
        elif suffix == "count":
            hist.count = number
        else:
            index = int(suffix[1:])
            if 0 <= index < len(hist.counts):
                hist.counts[index] = number
    return values


def quantile(buckets: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of a bucketed distribution, interpolated inside its bucket as
    Prometheus's ``histogram_quantile`` does; None without observations."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            upper = buckets[index] if index < len(buckets) else buckets[-1]
            lower = buckets[index - 1] if 0 < index <= len(buckets) else 0.0
            if index >= len(buckets):
                return float(upper)  # +Inf: the highest finite bound, as Prometheus answers
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return float(buckets[-1]) if buckets else math.nan
