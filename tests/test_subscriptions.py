"""Pub/sub subscriptions that survive real faults: a connection Redis closes while it
cannot be reached again at once, a connection that silently stops answering (half-open),
and a message handler that raises. The gateway's reply subscription must still deliver
every chunk exactly once, the worker's cancel subscription must still abort the job."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from redis.asyncio import Redis

from corral import connections, keys
from corral.jobs import JobStore
from corral.loops import LoopHealth
from corral.subscription import DEAD_AFTER, PING_INTERVAL, Subscription
from corral.tasks import cancel_and_wait
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import until
from tests.tcp_proxy import TcpProxy

StartCluster = Callable[..., Awaitable[LocalCluster]]

# The worker's own safety net (re-reading job states at each heartbeat) must not be what
# aborts the job in these tests: heartbeats every 30 s, and a node TTL to match.
SLOW_HEARTBEAT = {"heartbeat_interval": 30.0, "node_ttl": 90.0}


@pytest.fixture
async def proxy(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TcpProxy]:
    """A proxy in front of Redis that every subscription (and nothing else) goes through.

    The fleet builds every client from one URL; pointing only the subscriber factory at
    the proxy puts the fault on the subscriptions' connections and nowhere else."""
    proxy = await TcpProxy(redis_url).start()
    direct = connections.subscriber

    def through_proxy(url: str) -> Redis:
        assert url == redis_url
        return direct(proxy.url)

    monkeypatch.setattr(connections, "subscriber", through_proxy)
    try:
        yield proxy
    finally:
        await proxy.aclose()


def _words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


async def _output_length(redis: Redis, job_id: str) -> int:
    return int(await redis.llen(keys.output(job_id)))


def _assert_whole_answer_once(lines: list[str], words: str) -> None:
    parts = [json.loads(line) for line in lines if line]
    assert "".join(p.get("response", "") for p in parts) == f"echo: {words}"
    assert [p["done"] for p in parts].count(True) == 1 and parts[-1]["done"]
    # One line per token and the final one: nothing repeated, nothing merged.
    assert len(parts) == len(words.split()) + 2


async def _running_job(cluster: LocalCluster) -> str:
    """Submit a long wait=false job and return its id once the node is generating."""
    fake = cluster.nodes[0].fake.fake
    body = {"model": "llama3", "prompt": "long", "options": {"num_predict": 600}}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        submitted = await http.post(
            "/jobs", json={"kind": "generate", "wait": False, "request": body}
        )
    await fake.wait_until(lambda s: s["active"] == 1)
    return str(submitted.json()["id"])


# --- the gateway's reply subscription --------------------------------------------------


async def test_replies_published_while_the_subscription_was_killed_are_replayed(
    proxy: TcpProxy, start_cluster: StartCluster, redis: Redis
) -> None:
    """CLIENT KILL, and Redis out of reach for a moment: chunks published meanwhile reach
    the client anyway (replayed), once each. (A visible loss was recovered before the
    health-checked subscription too; this keeps it so.)"""
    cluster = await start_cluster([FakeOllamaConfig(token_rate=20)])
    words = _words(40)
    received: list[str] = []
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
        http.stream("POST", "/api/generate", json={"model": "llama3", "prompt": words}) as reply,
    ):
        job_id = reply.headers["x-corral-job-id"]
        lines = reply.aiter_lines()
        received += [await anext(lines) for _ in range(3)]
        proxy.hold_new()
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        published = await _output_length(redis, job_id)
        # Five chunks go out while no subscription of the gateway can hear them.
        await until(lambda: _at_least(redis, job_id, published + 5), True)
        proxy.release()
        async with asyncio.timeout(20):
            received += [line async for line in lines]
    _assert_whole_answer_once(received, words)
    assert cluster.gateway is not None
    assert cluster.gateway.state.router.subscription.resubscriptions >= 1


async def test_a_stream_past_its_replay_cap_ends_with_an_error_when_replies_were_lost(
    proxy: TcpProxy, start_cluster: StartCluster, redis: Redis
) -> None:
    """The worker keeps only the first CORRAL_REPLAY_MAX_MESSAGES chunks for replay: a
    gateway that lost chunks past the cap ends its client's answer with an error line,
    not a gap it would wait on until the timeout, nor the whole text a second time."""
    cluster = await start_cluster(
        [FakeOllamaConfig(token_rate=20)], worker={"replay_max_messages": 3}
    )
    words = _words(40)
    received: list[str] = []
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
        http.stream("POST", "/api/generate", json={"model": "llama3", "prompt": words}) as reply,
    ):
        job_id = reply.headers["x-corral-job-id"]
        lines = reply.aiter_lines()
        received += [await anext(lines) for _ in range(5)]  # past the cap
        proxy.hold_new()
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

        async def state() -> bytes | None:
            return await redis.hget(keys.job(job_id), "state")

        await until(state, b"done")  # the rest went out while nobody heard it
        proxy.release()
        async with asyncio.timeout(20):
            received += [line async for line in lines]
    last = json.loads(received[-1])
    assert "part of a long streamed answer was lost" in last["error"]
    text = "".join(json.loads(line).get("response", "") for line in received if line)
    assert text.count("echo:") == 1 and f"echo: {words}" not in text
    assert await redis.llen(keys.output(job_id)) == 3


async def test_a_silent_reply_subscription_is_replaced_within_seconds(
    proxy: TcpProxy, start_cluster: StartCluster
) -> None:
    """The subscription's connection stops answering (half-open): the gateway notices
    within DEAD_AFTER, subscribes again, replays, and the client gets all of its answer
    long before the request timeout."""
    cluster = await start_cluster([FakeOllamaConfig(token_rate=20)])
    words = _words(120)  # 6 s of generation: still running when the gateway recovers
    received: list[str] = []
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
        http.stream("POST", "/api/generate", json={"model": "llama3", "prompt": words}) as reply,
    ):
        lines = reply.aiter_lines()
        received += [await anext(lines) for _ in range(3)]
        assert proxy.freeze() >= 2  # the gateway's and the worker's subscriptions
        frozen_at = time.monotonic()
        async with asyncio.timeout(DEAD_AFTER + 10):
            received.append(await anext(lines))
            stalled = time.monotonic() - frozen_at
            received += [line async for line in lines]
    _assert_whole_answer_once(received, words)
    # Silent for DEAD_AFTER, then the backoff (at most 0.2 s) and a reconnect and replay.
    assert DEAD_AFTER - 0.5 < stalled < DEAD_AFTER + 2.0, stalled
    print(f"reply stream stalled {stalled:.2f}s after the freeze")


# --- the worker's cancel subscription ----------------------------------------------------


async def test_a_cancel_published_while_the_subscription_was_killed_still_aborts(
    proxy: TcpProxy, start_cluster: StartCluster, redis: Redis
) -> None:
    """CLIENT KILL, and the cancellation published before the worker is back: it aborts
    the job as soon as the worker has subscribed again, not at its next heartbeat."""
    cluster = await start_cluster(
        [FakeOllamaConfig(token_rate=20)], worker=SLOW_HEARTBEAT, gateway={"node_ttl": 90.0}
    )
    fake = cluster.nodes[0].fake.fake
    job_id = await _running_job(cluster)
    proxy.hold_new()
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await JobStore(redis, job_ttl=60, result_ttl=60).cancel(job_id)  # heard by no one
    assert fake.stats()["active"] == 1
    released_at = time.monotonic()
    proxy.release()
    await fake.wait_until(lambda s: s["active"] == 0, within=5)
    aborted = time.monotonic() - released_at
    assert aborted < 1.5, aborted  # reconnect + re-check; the next heartbeat is 30 s away
    assert await redis.hget(keys.job(job_id), "state") == b"cancelled"
    print(f"job aborted {aborted:.3f}s after Redis was reachable again")


async def test_a_silent_cancel_subscription_is_replaced_and_the_cancel_not_missed(
    proxy: TcpProxy, start_cluster: StartCluster, redis: Redis
) -> None:
    """The cancel subscription's connection stops answering; a cancellation sent into it
    is lost, yet aborts the job within DEAD_AFTER and a little."""
    cluster = await start_cluster(
        [FakeOllamaConfig(token_rate=20)], worker=SLOW_HEARTBEAT, gateway={"node_ttl": 90.0}
    )
    fake = cluster.nodes[0].fake.fake
    job_id = await _running_job(cluster)
    assert proxy.freeze() >= 2
    cancelled_at = time.monotonic()
    await JobStore(redis, job_ttl=60, result_ttl=60).cancel(job_id)
    await fake.wait_until(lambda s: s["active"] == 0, within=DEAD_AFTER + 5)
    aborted = time.monotonic() - cancelled_at
    assert aborted < DEAD_AFTER + 2.0, aborted
    print(f"job aborted {aborted:.2f}s after its cancellation went unheard")


async def test_a_garbage_reply_does_not_deafen_the_gateway(
    cluster: LocalCluster, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    assert cluster.gateway is not None
    channel = keys.reply_channel(cluster.gateway.state.gateway_id)
    assert await redis.publish(channel, b"not a reply") == 1
    body = {"model": "llama3", "prompt": "still there?", "stream": False}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        reply = await http.post("/api/generate", json=body)
    assert reply.status_code == 200 and reply.json()["response"] == "echo: still there?"
    assert any("handling a message" in r.getMessage() for r in caplog.records)


# --- the subscription itself -------------------------------------------------------------


async def test_a_handler_that_raises_loses_one_message_not_the_subscription(
    redis_url: str, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[bytes] = []

    def handle(data: bytes) -> None:
        if data == b"boom":
            raise ValueError("cannot handle this")
        got.append(data)

    client = connections.subscriber(redis_url)
    subscription = Subscription(client, "test:chan", handle, LoopHealth(), name="test-sub")
    task = asyncio.create_task(subscription.run())
    try:
        await asyncio.wait_for(subscription.subscribed.wait(), 5)
        for data in (b"before", b"boom", b"after"):
            await redis.publish("test:chan", data)
        await until(lambda: _copy(got), [b"before", b"after"])
        assert not task.done() and subscription.resubscriptions == 0
        failure = [r for r in caplog.records if "handling a message" in r.getMessage()]
        assert failure and failure[0].levelno == logging.ERROR and failure[0].exc_info
    finally:
        await cancel_and_wait(task)
        await client.aclose()


async def test_a_failed_recovery_runs_again_on_the_next_subscription(
    redis_url: str, redis: Redis
) -> None:
    got: list[bytes] = []
    calls: list[int] = []

    async def recover() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("Redis went away during the replay")

    client = connections.subscriber(redis_url)
    subscription = Subscription(
        client, "test:chan", got.append, LoopHealth(), name="test-sub", on_resubscribed=recover
    )
    task = asyncio.create_task(subscription.run())
    try:
        await asyncio.wait_for(subscription.subscribed.wait(), 5)
        assert calls == []  # nothing to recover on the first subscription
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await until(lambda: _resubscriptions(subscription), 1)
        assert len(calls) == 2
        await redis.publish("test:chan", b"after")
        await until(lambda: _copy(got), [b"after"])
        assert not task.done()
    finally:
        await cancel_and_wait(task)
        await client.aclose()


async def test_health_goes_stale_while_redis_is_unreachable_and_recovers(
    redis_url: str, redis: Redis
) -> None:
    proxy = await TcpProxy(redis_url).start()
    client = connections.subscriber(proxy.url)
    health = LoopHealth()
    recovered = asyncio.Event()

    async def recover() -> None:
        recovered.set()

    subscription = Subscription(
        client, "test:chan", lambda _: None, health, name="test-sub",
        on_resubscribed=recover, ping_interval=0.1, dead_after=0.3, stale_after=0.6,
    )  # fmt: skip
    task = asyncio.create_task(subscription.run())
    try:
        await asyncio.wait_for(subscription.subscribed.wait(), 5)
        assert health.stale() == []
        proxy.hold_new()  # a new connection would hang as well: Redis is unreachable
        proxy.freeze()
        await until(lambda: _stale(health), ["test-sub"], within=5)
        assert health.report()["test-sub"]["failures"] >= 1
        assert not recovered.is_set()
        proxy.release()
        await asyncio.wait_for(recovered.wait(), 10)
        await until(lambda: _stale(health), [], within=5)
        assert not task.done() and subscription.resubscriptions == 1
    finally:
        await cancel_and_wait(task)
        await client.aclose()
        await proxy.aclose()


def test_dead_after_must_outlast_the_ping_interval() -> None:
    with pytest.raises(ValueError, match="dead_after"):
        Subscription(Redis(), "c", print, LoopHealth(), name="n", ping_interval=1.0, dead_after=1.0)
    assert DEAD_AFTER > PING_INTERVAL


async def _at_least(redis: Redis, job_id: str, count: int) -> bool:
    return await _output_length(redis, job_id) >= count


async def _copy(items: list[bytes]) -> list[bytes]:
    return list(items)


async def _resubscriptions(subscription: Subscription) -> int:
    return subscription.resubscriptions


async def _stale(health: LoopHealth) -> list[str]:
    return health.stale()
