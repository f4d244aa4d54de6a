"""corral.telemetry and corral.series against a real Redis: what a flush writes, what a
failed flush keeps, and the percentiles read back."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from corral import keys, series
from corral.gateway.telemetry_loop import TelemetryLoop
from corral.loops import LoopHealth
from corral.telemetry import LATENCY_BUCKETS, RETENTION, Histogram, Recorder, quantile, read_metrics
from corral.tooling.redis_proc import free_port

LABELS = ("llama3:latest", "5", "ollama", "done")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_flush_writes_histograms_counters_and_the_seconds_series(redis: Redis) -> None:
    recorder = Recorder()
    for value in (0.004, 0.02, 0.02, 7.0):
        recorder.observe("total", LABELS, value)
        recorder.count("req", LABELS)
    recorder.count("tok", ("n1", "llama3:latest"), 40)
    await recorder.flush(redis)

    recorded = await read_metrics(redis)
    hist = recorded["total"][LABELS]
    assert isinstance(hist, Histogram)
    assert hist.count == 4 and hist.total == pytest.approx(7.044)
    assert sum(hist.counts) == 4 and hist.counts[0] == 1 and hist.counts[2] == 2
    assert recorded["req"][LABELS] == 4
    assert recorded["tok"][("n1", "llama3:latest")] == 40

    # Nothing is written twice: a second flush with nothing new changes nothing.
    await recorder.flush(redis)
    assert (await read_metrics(redis))["req"][LABELS] == 4

    # The events are in the series of the second they happened in, which expires.
    second = recorder.second()
    found = {}
    for start in range(second - 3, second + 1):
        found.update(await redis.hgetall(keys.series(1, start)))
        ttl = await redis.ttl(keys.series(1, start))
        assert ttl == -2 or 0 < ttl <= RETENTION[1] + 1
    assert found[b"req:done"] == b"4" and found[b"tok:n1"] == b"40"


async def test_a_failed_flush_keeps_its_figures_for_the_next(redis: Redis) -> None:
    dead = Redis(port=free_port(), socket_connect_timeout=1)
    recorder = Recorder()
    recorder.observe("wait", ("m", "0"), 0.2)
    with pytest.raises(RedisConnectionError):
        await recorder.flush(dead)
    recorder.observe("wait", ("m", "0"), 0.3)  # recorded while Redis was away
    await recorder.flush(redis)
    await dead.aclose()
    hist = (await read_metrics(redis))["wait"][("m", "0")]
    assert isinstance(hist, Histogram) and hist.count == 2


async def test_a_long_outage_keeps_counts_but_drops_seconds_too_old_to_show(redis: Redis) -> None:
    clock = Clock(1_000_000.0)
    recorder = Recorder(clock)
    dead = Redis(port=free_port(), socket_connect_timeout=1)
    recorder.count("req", LABELS)
    with pytest.raises(RedisConnectionError):
        await recorder.flush(dead)
    clock.now += 3 * RETENTION[1]
    recorder.count("req", LABELS)  # the outage goes on: a later failed flush drops old seconds
    with pytest.raises(RedisConnectionError):
        await recorder.flush(dead)
    await dead.aclose()
    assert len(recorder._pending.series) <= 1  # only seconds still on the graphs
    await recorder.flush(redis)
    assert (await read_metrics(redis))["req"][LABELS] == 2


async def test_series_graphs_from_what_was_flushed(redis: Redis) -> None:
    recorder = Recorder()
    recorder.gauges({"queued:p0": 3.0, "busy:n1": 1.0, "slots:n1": 4.0})
    for value in (0.1,) * 9 + (20.0,):
        recorder.observe("total", LABELS, value)
    await recorder.flush(redis)
    # The current second is not shown until it is over: read from a second later.
    _, slots = await series.read_slots(redis, 1, 10, now=recorder.second() + 1)
    assert len(slots) == 10
    graphs = {g["id"]: g for g in series.graphs(slots, 1)}
    lines = {line["name"]: line["values"] for line in graphs["total"]["lines"]}
    assert max(v for v in lines["p50"] if v is not None) <= 0.1
    assert max(v for v in lines["p99"] if v is not None) > 10
    queued = {line["name"]: line["values"] for line in graphs["queued"]["lines"]}
    assert 3.0 in queued["p0"]
    slots_line = {line["name"]: line["values"] for line in graphs["slots"]["lines"]}
    assert 25.0 in slots_line["n1"]


def test_quantile_interpolates_inside_the_bucket_as_prometheus_does() -> None:
    counts = [0.0] * (len(LATENCY_BUCKETS) + 1)
    counts[4] = 10  # all in (0.05, 0.1]
    assert quantile(LATENCY_BUCKETS, counts, 0.5) == pytest.approx(0.075)
    counts[-1] = 10  # as many past the last bound: +Inf answers the highest bound
    assert quantile(LATENCY_BUCKETS, counts, 0.99) == LATENCY_BUCKETS[-1]
    assert quantile(LATENCY_BUCKETS, [0.0] * len(counts), 0.5) is None


async def test_redis_refusing_writes_loses_nothing_and_counts_nothing_twice(redis: Redis) -> None:
    recorder = Recorder()
    recorder.count("req", LABELS, 3)
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")  # every write is refused with OOM
    try:
        with pytest.raises(ResponseError, match="maxmemory"):
            await recorder.flush(redis)
    finally:
        await redis.config_set("maxmemory", "0")
    recorder.count("req", LABELS, 2)
    await recorder.flush(redis)
    assert (await read_metrics(redis))["req"][LABELS] == 5


class BrokenSampler(TelemetryLoop):
    async def sample(self) -> None:
        raise RuntimeError("the snapshot failed")


async def test_a_failed_sample_does_not_hold_back_the_counts(redis: Redis) -> None:
    recorder = Recorder()
    loop = BrokenSampler(
        redis, recorder, LoopHealth(), gateway_id="g", redis_url="", node_ttl=5, gateway_ttl=5
    )
    recorder.count("req", LABELS)
    with pytest.raises(RuntimeError):
        await loop.tick()  # loops.every logs it and goes on
    assert (await read_metrics(redis))["req"][LABELS] == 1
