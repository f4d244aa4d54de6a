"""The response cache's Prometheus metrics, appended to ``/metrics``.

Request outcomes and L1 figures are this gateway process's own (label ``gateway``); L2
figures are fleet-wide, read from the cache's counters in Redis.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.gateway.cache_store import CacheStore

OUTCOMES = ("hit", "miss", "bypass")


async def render(store: CacheStore, gateway_id: str) -> bytes:
    l2_bytes, l2_evictions = await store.l2_figures()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Cache(store, gateway_id, l2_bytes, l2_evictions))
    return generate_latest(registry)


class _Cache(Collector):
    def __init__(self, store: CacheStore, gateway_id: str, l2_bytes: int, l2_evictions: int):
        self.store = store
        self.gateway_id = gateway_id
        self.l2 = (l2_bytes, l2_evictions)

    def collect(self) -> Iterator[Metric]:
        store = self.store
        requests = CounterMetricFamily(
            "corral_cache_requests",
            "Requests of a cacheable kind answered by this gateway process, by cache outcome "
            "(hit: from the cache or a shared job; miss: ran the job; bypass: not cacheable).",
            labels=["outcome", "gateway"],
        )
        for outcome in OUTCOMES:
            requests.add_metric([outcome, self.gateway_id], store.outcomes[outcome])
        yield requests
        evictions = CounterMetricFamily(
            "corral_cache_evictions",
            "Cached answers evicted to stay within the byte budget (l1: this gateway "
            "process; l2: the fleet's Redis).",
            labels=["tier"],
        )
        evictions.add_metric(["l1"], store.l1_evictions)
        evictions.add_metric(["l2"], self.l2[1])
        yield evictions
        size = GaugeMetricFamily(
            "corral_cache_bytes",
            "Bytes of cached answers held (l1: this gateway process; l2: the fleet's Redis).",
            labels=["tier"],
        )
        size.add_metric(["l1"], store.l1_bytes)
        size.add_metric(["l2"], self.l2[0])
        yield size
