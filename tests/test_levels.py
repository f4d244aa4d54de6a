"""Degradation levels: the scheduler's level computer (hysteresis, drain rates), the
published report and its expiry, and what each level does to requests on a live fleet."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from corral import keys
from corral.gateway.fleetview import FleetView
from corral.load import NO_LOAD, LoadReport, ModelLoad
from corral.loops import LoopHealth
from corral.scheduler.levels import DrainMeter, LevelComputer, Levels, ModelFigures
from corral.settings import SchedulerSettings
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import until

StartCluster = Callable[..., Awaitable[LocalCluster]]
MODEL = "llama3:latest"

# ------------------------------------------------------------------ the level computer


def test_levels_enter_at_their_threshold_and_leave_only_clearly_below() -> None:
    computer = LevelComputer((0.6, 0.8, 0.95), hysteresis=0.1)
    seen = [computer.update(load) for load in (0.0, 0.59, 0.6, 0.79, 0.8, 0.96, 0.9, 0.86)]
    assert seen == [0, 0, 1, 1, 2, 3, 3, 3]  # 0.86 is not yet 0.1 below 0.95
    assert computer.update(0.84) == 2  # below 0.85: level 3 is left
    assert computer.update(0.75) == 2  # hovering around 0.8 does not flap
    assert computer.update(0.81) == 2
    assert computer.update(0.69) == 1
    assert computer.update(0.2) == 0  # several levels at once when the load falls far
    assert computer.update(1.5) == 3  # and straight up


def test_a_level_is_held_for_a_while_after_the_load_last_reached_it() -> None:
    computer = LevelComputer((0.6, 0.8, 0.95), hysteresis=0.1, hold=3.0)
    assert computer.update(1.2, now=100.0) == 3
    assert computer.update(0.2, now=101.0) == 3  # its shedding worked at once: held
    assert computer.update(1.0, now=102.0) == 3  # reached again: the hold starts over
    assert computer.update(0.2, now=104.5) == 3
    assert computer.update(0.9, now=105.5) == 3  # between the exit line and the threshold
    assert computer.update(0.7, now=105.6) == 1  # held 3 s since 102: now it may fall
    assert computer.update(0.3, now=106.0) == 1  # level 1 was entered at 105.6
    assert computer.update(0.3, now=108.7) == 0


def test_drain_rate_is_measured_only_while_the_queue_has_a_backlog() -> None:
    meter = DrainMeter(window=30.0)
    assert meter.update("m", 100.0, delivered=0, queued=10) == 0.0  # first sight: no rate
    assert meter.update("m", 102.0, delivered=8, queued=6) == pytest.approx(4.0)
    # The queue emptied: the claims that follow come at the arrival rate, not capacity.
    assert meter.update("m", 104.0, delivered=9, queued=0) == pytest.approx(4.0)
    assert meter.update("m", 114.0, delivered=10, queued=0) == pytest.approx(4.0)
    # A counter that went back (stream recreated) measures nothing.
    assert meter.update("m", 116.0, delivered=2, queued=5) == pytest.approx(4.0)
    assert meter.update("m", 117.0, delivered=4, queued=5) < 4.0  # slower now: it moves
    assert meter.update("m", 118.0, delivered=None, queued=5) > 0  # no counter: kept


def _settings(**overrides: Any) -> SchedulerSettings:
    return SchedulerSettings(redis_url="redis://127.0.0.1:1/0", **overrides)


def test_load_is_occupancy_or_expected_wait_whichever_is_worse() -> None:
    levels = Levels(_settings(level_jobs_per_slot=2.0, level_wait_full=60.0))
    idle = levels.compute(10.0, 4, {MODEL: ModelFigures([0] * 10, running=2, delivered=0)})
    assert (idle.level, idle.occupancy, idle.retry_after) == (0, 0.25, 0.0)
    # 5 queued (2 at p0, 3 at p9) + 4 running over 4 slots x 2: occupancy 1.125.
    queued = [2, 0, 0, 0, 0, 0, 0, 0, 0, 3]
    busy = levels.compute(12.0, 4, {MODEL: ModelFigures(queued, running=4, delivered=10)})
    assert (busy.level, busy.queued, busy.running) == (3, 5, 4)
    assert busy.occupancy == pytest.approx(9 / 8)
    assert busy.models[MODEL].ahead == (2, 2, 2, 2, 2, 2, 2, 2, 2, 5)
    # The next pass measures a drain of 10 jobs in 2 s with a backlog throughout.
    later = levels.compute(14.0, 4, {MODEL: ModelFigures(queued, running=4, delivered=20)})
    assert later.rate == pytest.approx(5.0)
    assert later.wait == pytest.approx(1.0)
    assert later.queue_wait(MODEL, 0) == pytest.approx(0.4)
    # Retry-After: the jobs above level 3's exit line (0.85 x 8) drained at 5 jobs/s.
    assert later.retry_after == pytest.approx(max(1.0, (9 - 0.85 * 8) / 5))
    # A long wait alone is load: 300 queued at 5/s is 60 s, the wait counted as full.
    slow = levels.compute(16.0, 1000, {MODEL: ModelFigures([300] + [0] * 9, 0, 30)})
    assert slow.occupancy < 0.2 and slow.load >= 1.0 and slow.level == 3


def test_no_live_slot_with_work_waiting_is_full_load() -> None:
    levels = Levels(_settings())
    report = levels.compute(1.0, 0, {MODEL: ModelFigures([1] + [0] * 9, 0, 0)})
    assert report.level == 3 and math.isfinite(report.load)
    assert LoadReport.decode(report.encode()) == report


def test_levels_off_publishes_level_zero_with_the_figures() -> None:
    levels = Levels(_settings(levels=False))
    report = levels.compute(1.0, 1, {MODEL: ModelFigures([50] + [0] * 9, 1, 0)})
    assert report.level == 0 and report.load > 1 and report.queued == 50


def test_a_bad_or_missing_report_is_level_zero() -> None:
    for raw in (
        None,
        b"",
        b"not json",
        b'{"level": 7}',
        b'{"level": 1, "models": 3}',
        b"[1]",
        b'{"level": 1, "models": {"m": {"rate": 1, "ahead": [1]}}}',
    ):
        assert LoadReport.decode(raw) is NO_LOAD


def test_thresholds_must_rise() -> None:
    from corral.errors import ConfigError

    with pytest.raises(ConfigError, match="LEVEL_MINOR"):
        SchedulerSettings.build(level_minor=0.9, level_major=0.8)


# --------------------------------------------------------- publishing and expiry (Redis)


async def test_scheduler_publishes_with_a_ttl_and_a_stopped_one_expires(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig()], gateway={"fleet_refresh": 0.1}, scheduler={"load_ttl": 1.0}
    )
    await until(lambda: redis.exists(keys.LOAD), 1)
    assert 0 < await redis.pttl(keys.LOAD) <= 1000
    report = LoadReport.decode(await redis.get(keys.LOAD))
    assert report.slots == 1 and report.ttl == 1.0
    await _publish(redis, replace(report, level=3, load=2.0), ttl=5.0)
    assert cluster.scheduler is not None
    await cluster.scheduler.stop()
    cluster.scheduler = None
    await _publish(redis, replace(report, level=3, load=2.0), ttl=1.0)  # its last word
    view = _view(cluster)
    await until(lambda: _level(view), 3)
    await until(lambda: _level(view), 0, within=10)  # the key expired: back to normal


async def test_a_gateway_that_cannot_read_redis_keeps_the_level_only_for_its_ttl(
    redis_url: str, redis: Redis
) -> None:
    report = LoadReport(level=3, load=1.2, at=1.0, ttl=0.5)
    await _publish(redis, report, ttl=60.0)
    view = FleetView(redis, "gw-test", node_ttl=6.0, interval=1.0, health=LoopHealth())
    await view.refresh()
    assert view.level == 3
    view.redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        with pytest.raises(Exception):  # noqa: B017 - any connection error
            await view.refresh()
        assert view.level == 3  # a blip keeps the last level
        async with asyncio.timeout(10):
            while view.level:
                with pytest.raises(Exception):  # noqa: B017
                    await view.refresh()
                await asyncio.sleep(0.05)
        assert view.load is NO_LOAD
    finally:
        await view.redis.aclose()


async def test_a_burst_raises_the_level_and_it_falls_after(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=2, token_rate=200)],
        gateway={"fleet_refresh": 0.1},
        scheduler={"drain_window": 5.0},
    )
    view = _view(cluster)
    assert view.level == 0
    request = {"model": "llama3", "prompt": "x", "options": {"num_predict": 60}}
    job = {"kind": "generate", "wait": False, "priority": 5, "request": request}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        for _ in range(12):  # 12 jobs of 0.3 s on 2 slots: occupancy 3 at first
            assert (await http.post("/jobs", json=job)).status_code == 202
        await until(lambda: _level(view), 3)
        # Held at 3 for CORRAL_LEVEL_HOLD (3 s) at least: shed, with the scheduler's figure.
        shed = await http.post("/jobs", json={**job, "priority": 9, "wait": True})
        assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
        urgent = await http.post("/jobs", json={**job, "priority": 0, "wait": True})
        assert urgent.status_code == 200 and urgent.json()["state"] == "done"
        await until(lambda: _level(view), 0, within=30)
    stats = cluster.nodes[0].fake.fake.stats()
    assert stats["completed"] == 13


# ------------------------------------------------------------ each level's effect, live


async def test_level_1_caps_num_predict_and_says_so(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"degrade_num_predict": 3})
    await _set_level(cluster, redis, LoadReport(level=1, load=0.7, at=1.0, ttl=30))
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        body = {"model": "llama3", "prompt": "a b c d e f g", "stream": False}
        low = await http.post("/api/generate", json=body, headers=_prio(5))
        assert low.status_code == 200
        assert low.headers["x-corral-degraded"] == "level=1; num_predict=3"
        assert low.json()["eval_count"] == 3
        urgent = await http.post("/api/generate", json=body, headers=_prio(0))
        assert "x-corral-degraded" not in urgent.headers
        assert urgent.json()["response"] == "echo: a b c d e f g"
        small = {**body, "options": {"num_predict": 2}}  # already under the cap
        asked = await http.post("/api/generate", json=small, headers=_prio(9))
        assert "x-corral-degraded" not in asked.headers and asked.json()["eval_count"] == 2
        streamed = await http.post("/api/chat", headers=_prio(9), json={
            "model": "llama3", "messages": [{"role": "user", "content": "a b c d e"}]})  # fmt: skip
        assert streamed.headers["x-corral-degraded"] == "level=1; num_predict=3"
        assert streamed.text.count("\n") == 4  # three chunks and the final line
        floating = {**body, "options": {"num_predict": 2.0}}  # Ollama takes any number
        asked = await http.post("/api/generate", json=floating, headers=_prio(9))
        assert "x-corral-degraded" not in asked.headers and asked.json()["eval_count"] == 2
        job = {"kind": "generate", "request": body, "priority": 9, "wait": False}
        queued = await http.post("/jobs", json=job)
        assert queued.status_code == 202
        assert queued.headers["x-corral-degraded"] == "level=1; num_predict=3"
        v1 = await http.post(
            "/v1/chat/completions",
            headers=_prio(9),
            json={"model": "llama3", "messages": [{"role": "user", "content": "a b c d e"}]},
        )
        assert v1.headers["x-corral-degraded"] == "level=1; num_predict=3"
        assert v1.json()["usage"]["completion_tokens"] == 3
        assert v1.json()["choices"][0]["finish_reason"] == "length"
        # A degraded answer that the cache keeps says so again when it is served from there.
        exact = {**body, "options": {"temperature": 0}}
        first = await http.post("/api/generate", json=exact, headers=_prio(9))
        again = await http.post("/api/generate", json=exact, headers=_prio(9))
        assert first.headers["x-corral-cache"] == "miss"
        assert again.headers["x-corral-cache"] == "hit"
        for answer in (first, again):
            assert answer.headers["x-corral-degraded"] == "level=1; num_predict=3"
            assert answer.json()["eval_count"] == 3


async def test_the_level_is_on_metrics_status_and_corral_status(
    start_cluster: StartCluster, redis: Redis
) -> None:
    from corral import status
    from corral.snapshot import take_snapshot

    cluster = await start_cluster([FakeOllamaConfig()])
    report = LoadReport(
        level=2, load=0.85, wait=12.5, slots=2, queued=3, running=2, rate=0.4, at=1.0,
        ttl=30, models={MODEL: ModelLoad(0.4, (0,) * 9 + (3,))},
    )  # fmt: skip
    await _set_level(cluster, redis, report)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        metrics = (await http.get("/metrics")).text
        page = (await http.get("/status.json")).json()  # what the dashboard draws
    assert "\ncorral_degradation_level 2.0\n" in metrics
    assert 'corral_drain_rate_jobs_per_second{model="llama3:latest"} 0.4' in metrics
    assert page["level"] == 2 and page["load"]["load"] == 0.85
    snapshot = await take_snapshot(redis, "redis://test", node_ttl=6.0, gateway_ttl=30.0)
    text = status.render(snapshot)
    assert "LEVEL  2 (major)  load 0.85" in text and "expected wait 12.5s" in text
    assert "llama3:latest                drain 0.40 jobs/s  queued 3" in text
    await redis.delete(keys.LOAD)
    snapshot = await take_snapshot(redis, "redis://test", node_ttl=6.0, gateway_ttl=30.0)
    assert "LEVEL  0 (normal): no load report" in status.render(snapshot)


async def test_level_2_maps_heavy_models_to_light_ones_for_low_priorities(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(models=["big:70b", "small:8b"])],
        gateway={"degrade_models": "big:70b=small:8b", "degrade_num_predict": 50},
    )
    await _set_level(cluster, redis, LoadReport(level=2, load=0.85, at=1.0, ttl=30))
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        body = {"model": "big:70b", "prompt": "hi", "stream": False}
        low = await http.post("/api/generate", json=body, headers=_prio(6))
        assert low.json()["model"] == "small:8b"
        assert low.headers["x-corral-degraded"] == "level=2; model=small:8b; num_predict=50"
        mid = await http.post("/api/generate", json=body, headers=_prio(4))  # capped, not mapped
        assert mid.json()["model"] == "big:70b"
        assert mid.headers["x-corral-degraded"] == "level=2; num_predict=50"
        high = await http.post("/api/generate", json=body, headers=_prio(1))
        assert high.json()["model"] == "big:70b" and "x-corral-degraded" not in high.headers
    started = [entry["model"] for entry in cluster.nodes[0].fake.fake.stats()["started"]]
    assert sorted(started) == ["big:70b", "big:70b", "small:8b"]


async def test_level_3_refuses_low_priorities_with_a_computed_retry_after(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()])
    report = LoadReport(level=3, load=1.3, at=1.0, ttl=30, rate=2.0, retry_after=41.2)
    await _set_level(cluster, redis, report)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        body = {"model": "llama3", "prompt": "hi", "stream": False}
        low = await http.post("/api/generate", json=body, headers=_prio(7))
        assert low.status_code == 503 and low.headers["retry-after"] == "42"
        assert "overloaded" in low.json()["error"]
        high = await http.post("/api/generate", json=body, headers=_prio(0))
        assert high.status_code == 200 and high.json()["response"] == "echo: hi"
        assert "x-corral-degraded" not in high.headers  # priority 0 keeps full service
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0)
    async with client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model="llama3",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers=_prio(9),
            )
    assert refused.value.response.headers["retry-after"] == "42"


# ---------------------------------------------------------------------------- admission


async def test_a_timeout_the_queue_cannot_meet_is_refused_at_once(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()])
    # 30 jobs queued at priority 9 and none above, draining 2 jobs/s: a priority-9 job
    # waits about 15 s, a priority-0 job nothing.
    ahead = (0,) * 9 + (30,)
    report = LoadReport(level=0, at=1.0, ttl=30, rate=2.0, models={MODEL: ModelLoad(2.0, ahead)})
    await _set_level(cluster, redis, report, level=0)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        body = {"model": "llama3", "prompt": "hi", "stream": False}
        tight = {**_prio(9), "x-corral-timeout": "5"}
        refused = await http.post("/api/generate", json=body, headers=tight)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "15"
        assert refused.headers["x-corral-queue-wait"] == "15.0"
        assert "expected queue wait 15.0s" in refused.json()["error"]
        job = {"kind": "generate", "request": body, "priority": 9, "timeout": 5}
        assert (await http.post("/jobs", json=job)).status_code == 503  # the job API's timeout
        roomy = await http.post(
            "/api/generate", json=body, headers={**tight, "x-corral-timeout": "20"}
        )
        assert roomy.status_code == 200
        urgent = await http.post("/api/generate", json=body, headers={**tight, **_prio(0)})
        assert urgent.status_code == 200
        untimed = await http.post("/api/generate", json=body, headers=_prio(9))
        assert untimed.status_code == 200  # no timeout asked: it may wait
    assert await redis.hget(keys.STATS, "enqueued") == b"3"  # the refused ones never queued


async def test_global_queue_limit(start_cluster: StartCluster, redis: Redis) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"max_queue_total": 100})
    report = LoadReport(level=0, at=1.0, ttl=30, queued=100, rate=4.0)
    await _set_level(cluster, redis, report, level=0)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        body = {"model": "llama3", "prompt": "hi", "stream": False}
        full = await http.post("/api/generate", json=body, headers=_prio(0))
        assert full.status_code == 503 and full.headers["retry-after"] == "25"
        v1 = await http.post(
            "/v1/chat/completions",
            json={"model": "llama3", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert v1.status_code == 429 and v1.json()["error"]["type"] == "rate_limit_error"
        await _set_level(cluster, redis, replace(report, queued=99), level=0)
        assert (await http.post("/api/generate", json=body)).status_code == 200


async def test_a_full_model_queue_says_when_to_retry_from_its_drain_rate(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=1, token_rate=50)], gateway={"max_queue": 2}
    )
    report = LoadReport(at=1.0, ttl=30, rate=0.5, models={MODEL: ModelLoad(0.25)})
    await _set_level(cluster, redis, report, level=0)
    fake = cluster.nodes[0].fake.fake
    request = {"model": "llama3", "prompt": "x", "options": {"num_predict": 50}}
    slow = {"kind": "generate", "wait": False, "request": request}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        assert (await http.post("/jobs", json=slow)).status_code == 202
        await fake.wait_until(lambda s: s["active"] == 1)
        for _ in range(2):
            assert (await http.post("/jobs", json=slow)).status_code == 202
        full = await http.post("/api/generate", json={"model": "llama3", "prompt": "x"})
    assert full.status_code == 503 and full.headers["retry-after"] == "8"  # 2 jobs at 0.25/s


# ------------------------------------------------------------------------------ helpers


def _prio(priority: int) -> dict[str, str]:
    return {"x-corral-priority": str(priority)}


def _view(cluster: LocalCluster) -> FleetView:
    assert cluster.gateway is not None
    view: FleetView = cluster.gateway.state.fleet
    return view


async def _level(view: FleetView) -> int:
    return view.level


async def _publish(redis: Redis, report: LoadReport, ttl: float) -> None:
    await redis.set(keys.LOAD, report.encode(), px=int(ttl * 1000))


async def _set_level(
    cluster: LocalCluster, redis: Redis, report: LoadReport, level: int | None = None
) -> None:
    """Publish ``report`` as the scheduler would and make the gateway read it now."""
    await _publish(redis, report, ttl=report.ttl or 30)
    view = _view(cluster)
    await view.refresh()
    assert view.level == (report.level if level is None else level)
    assert view.load == report


async def test_a_load_report_redis_refuses_is_skipped_and_expires(redis: Redis) -> None:
    """Publishing is the last step of a pass: a Redis refusing writes (OOM) must not fail
    the pass for it; the report already there expires on its own."""
    levels = Levels(_settings(load_ttl=1.0))
    assert await levels.publish(redis, [MODEL]) is not None
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")
    try:
        assert await levels.publish(redis, [MODEL]) is None  # raises without the handling
        assert levels.failures == 1
        await until(lambda: redis.exists(keys.LOAD), 0)
    finally:
        await redis.config_set("maxmemory", "0")
    assert await levels.publish(redis, [MODEL]) is not None
    assert levels.failures == 0
