"""Faults other than a clean kill: Redis refusing writes or stalling, a node answering
garbage or slowly, loops that die, owners that vanish, clocks that disagree, jobs that
never end. Each test fails without the handling it names."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import ollama
import pytest
from redis.asyncio import Redis

from corral import fleet, keys, loops
from corral.jobs import JobStore
from corral.tooling.cluster import LocalCluster, LocalScheduler
from corral.tooling.fake_ollama import FakeOllamaConfig
from corral.tooling.fake_ollama_text import echo_tokens
from corral.tooling.redis_proc import RedisProcess
from tests.helpers import until

StartCluster = Callable[..., Awaitable[LocalCluster]]
GENERATE = {"model": "llama3", "prompt": "hello there", "stream": False}


async def _state(redis: Redis, job_id: str) -> str:
    state = await redis.hget(keys.job(job_id), "state")
    return state.decode() if state else ""


@pytest.fixture
async def refusing_writes(redis: Redis) -> AsyncIterator[Callable[[bool], Awaitable[None]]]:
    """Switch Redis into refusing writes (``maxmemory`` reached under ``noeviction``)."""

    async def refuse(on: bool) -> None:
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", "1" if on else "0")

    try:
        yield refuse
    finally:
        await refuse(False)


def _loop_failed(report: dict[str, Any], name: str) -> bool:
    return bool(report.get(name, {}).get("failures"))


def _loop_healthy(report: dict[str, Any], name: str) -> bool:
    entry = report.get(name, {})
    return bool(entry.get("ok")) and not entry.get("failures")


async def test_loops_survive_redis_refusing_writes(
    start_cluster: StartCluster, refusing_writes: Callable[[bool], Awaitable[None]]
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"fleet_refresh": 0.2})
    worker = cluster.nodes[0].worker
    gateway = cluster.gateway
    assert gateway is not None
    await refusing_writes(True)

    async def both(check: Callable[[dict[str, Any], str], bool]) -> bool:
        return check(worker.health.report(), "heartbeat") and check(
            gateway.state.health.report(), "fleet-view"
        )

    # Every loop meets an OOM error reply (not a connection error) at least once...
    await until(lambda: both(_loop_failed), True)
    await refusing_writes(False)
    await until(lambda: both(_loop_healthy), True)  # ...and is back to health after it
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        reply = await http.post("/api/generate", json=GENERATE)
        assert reply.status_code == 200 and reply.json()["response"] == "echo: hello there"
        health = (await http.get("/healthz")).json()
    assert health["status"] == "ok" and health["nodes"] == 1
    assert health["loops"]["fleet-view"]["ok"] and health["loops"]["reply-subscription"]["ok"]


async def test_healthz_is_503_when_a_loop_is_stale(cluster: LocalCluster) -> None:
    assert cluster.gateway is not None
    health = cluster.gateway.state.health
    health.register("stuck-loop", stale_after=0.0)  # never succeeded, and due at once
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        reply = await http.get("/healthz")
    assert reply.status_code == 503
    assert reply.json()["status"] == "stale"
    assert reply.json()["loops"]["stuck-loop"]["ok"] is False
    assert reply.json()["loops"]["fleet-view"]["ok"] is True


def _task_named(name: str) -> asyncio.Task[Any]:
    found = [t for t in asyncio.all_tasks() if t.get_name() == name and not t.done()]
    assert len(found) == 1, f"expected one running task {name!r}, found {len(found)}"
    return found[0]


async def test_a_gateway_whose_loop_ended_stops_with_a_failure(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()])
    gateway = cluster.gateway
    assert gateway is not None and gateway.task is not None
    gateway.state.fleet.task.cancel()  # as if the loop had ended by itself
    async with asyncio.timeout(10):
        await asyncio.wait([gateway.task])
    assert "fleet-view" in gateway.app.failure


async def test_a_worker_whose_loop_ended_stops_with_an_error(start_cluster: StartCluster) -> None:
    cluster = await start_cluster([FakeOllamaConfig()])
    node = cluster.nodes[0]
    _task_named("heartbeat").cancel()  # as if the loop had ended by itself
    async with asyncio.timeout(15):
        await asyncio.wait([node.task])
    assert isinstance(node.task.exception(), loops.LoopDied)


async def test_garbage_is_retried_counted_and_dead_lettered_with_its_reason(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(garbage_marker="GARBAGE", garbage_kind="json")],
        gateway={"max_attempts": 3},
        scheduler={"retry_base": 0.05, "retry_cap": 0.05},
    )
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        reply = await http.post("/api/generate", json={**GENERATE, "prompt": "GARBAGE please"})
        job_id = reply.headers["x-corral-job-id"]
        view = (await http.get(f"/jobs/{job_id}")).json()
    assert reply.status_code == 503
    assert "gave up after 3 attempt(s)" in reply.json()["error"]
    assert "not NDJSON" in reply.json()["error"]  # the last backend reason, named
    assert view["state"] == "dead" and view["attempts"] == 3
    assert len(view["history"]) == 3


@pytest.mark.parametrize("kind", ["json", "html", "truncate", "cut"])
async def test_a_garbage_answer_is_a_failed_attempt_and_the_retry_answers(
    start_cluster: StartCluster, kind: str
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(garbage_marker="G", garbage_kind=kind)],
        scheduler={"retry_base": 0.05, "retry_cap": 0.05},
    )
    fake = cluster.nodes[0].fake.fake
    async with ollama.AsyncClient(host=cluster.url) as client:
        asked = asyncio.create_task(client.generate(model="llama3", prompt="G once"))
        await fake.wait_until(lambda s: s["garbage"] >= 1)
        fake.configure(garbage_marker="")  # the node recovers: the retry gets a real answer
        answer = await asked
    assert answer.response == "echo: G once"
    assert fake.stats()["garbage"] == 1 and fake.stats()["completed"] == 1


async def test_a_holder_missing_from_the_registry_is_reclaimed(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], scheduler={"node_ttl": 0.5})
    await cluster.nodes[0].stop()
    cluster.nodes.clear()
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    await fleet.publish_heartbeat(
        redis, {"node_id": "keeper", "state": "running", "models": [{"name": "llama3:latest"}]}, 60
    )  # keeps llama3 routable
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        submitted = await http.post(
            "/jobs", json={"kind": "generate", "wait": False, "request": GENERATE}
        )
        job_id = submitted.json()["id"]
    # A node claims it and is never registered (or was removed by an operator).
    claimed = await store.claim("llama3:latest", "unregistered")
    assert claimed is not None and claimed.job_id == job_id
    replacement = await cluster.add_node(FakeOllamaConfig(), node_id="fresh")
    await until(lambda: _state(redis, job_id), "done", within=10)
    view = await store.get(job_id)
    assert view is not None and view["node"] == "fresh" and view["attempts"] == 2
    assert view["history"][0]["error"] == "node unregistered left the registry while holding it"
    assert replacement.fake.fake.stats()["completed"] == 1


async def test_a_worker_holding_entries_it_could_not_hand_back_stays_registered(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()])
    node = cluster.nodes[0]
    await node.stop()  # graceful, holding nothing: it leaves the registry
    cluster.nodes.clear()
    assert await redis.zscore(keys.NODES, node.node_id) is None

    await fleet.publish_heartbeat(
        redis, {"node_id": "keeper", "state": "running", "models": [{"name": "llama3:latest"}]}, 60
    )  # keeps llama3 routable
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        posted = await http.post(
            "/jobs", json={"kind": "generate", "wait": False, "request": GENERATE}
        )
        assert posted.status_code == 202, posted.text
    # Pending under this node's name, and no runner of the next incarnation holds it (as
    # when a hand-back failed for good): the worker must not hide it by leaving.
    held = await JobStore(redis, job_ttl=60, result_ttl=60).claim("llama3:latest", node.node_id)
    assert held is not None
    again = await cluster.add_node(FakeOllamaConfig(), node_id=node.node_id)
    await again.stop()
    cluster.nodes.clear()
    assert await redis.zscore(keys.NODES, node.node_id) is not None  # still registered


async def test_a_slow_api_ps_never_delays_heartbeats(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(ps_delay=9.0, token_rate=20)],
        worker={"node_ttl": 1.5, "heartbeat_interval": 0.3, "ps_timeout": 0.5},
        scheduler={"node_ttl": 1.5},
    )
    async with ollama.AsyncClient(host=cluster.url) as client:
        parts = [
            part.response
            async for part in await client.generate(
                model="llama3",
                prompt="a long answer",
                stream=True,
                options={"num_predict": 60},  # 3 s at 20 tokens/s: two node TTLs
            )
        ]
    assert "".join(parts).startswith("echo: a long answer")
    assert await redis.hget(keys.STATS, "requeued") is None  # never taken back as dead


@pytest.mark.parametrize("offset", [30.0, -30.0])
async def test_a_worker_with_a_skewed_clock_is_neither_dead_nor_expiring(
    start_cluster: StartCluster, redis: Redis, offset: float
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(token_rate=50)],
        worker={"clock_offset": offset, "node_ttl": 2.0},
        scheduler={"node_ttl": 2.0},
    )
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        replies = await asyncio.gather(
            *(
                http.post(
                    "/api/generate",
                    json={**GENERATE, "prompt": f"p{i}", "options": {"num_predict": 100}},
                    headers={"x-corral-timeout": "20"},  # a deadline, checked at claim
                )
                for i in range(4)
            )
        )
        assert [r.status_code for r in replies] == [200] * 4
        nodes = (await http.get("/nodes")).json()["nodes"]
    assert [n["node_id"] for n in nodes] == ["node1"]
    stats = await redis.hgetall(keys.STATS)
    assert b"requeued" not in stats and b"orphaned" not in stats and b"expired" not in stats


async def test_a_job_past_its_run_timeout_is_aborted_on_the_node(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster([FakeOllamaConfig(token_rate=5)])
    fake = cluster.nodes[0].fake.fake
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        reply = await http.post(
            "/api/generate",
            json={**GENERATE, "options": {"num_predict": 10_000}},  # 2,000 s at 5 tokens/s
            headers={"x-corral-run-timeout": "1"},
        )
        view = (await http.get(f"/jobs/{reply.headers['x-corral-job-id']}")).json()
        refused = await http.post(
            "/api/generate", json=GENERATE, headers={"x-corral-run-timeout": "999999"}
        )
    assert reply.status_code == 504 and "run timeout of 1s" in reply.json()["error"]
    assert view["state"] == "failed" and view["attempts"] == 1
    await fake.wait_until(lambda s: s["active"] == 0 and s["disconnects"] == 1)
    assert refused.status_code == 400 and "X-Corral-Run-Timeout" in refused.json()["error"]


async def test_a_redis_stall_past_the_client_timeout_runs_and_answers_each_job_once(
    start_cluster: StartCluster, redis: Redis, redis_server: RedisProcess
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=4, token_rate=10)],
        worker={"node_ttl": 3.0},
        scheduler={"node_ttl": 3.0},
    )
    fake = cluster.nodes[0].fake.fake
    prompts = [f"stall {i}" for i in range(6)]

    async def ask(client: ollama.AsyncClient, prompt: str, stream: bool) -> str:
        options = {"num_predict": 40}  # about 4 s each, so the stall lands mid-answer
        if not stream:
            reply = await client.generate(model="llama3", prompt=prompt, options=options)
            return reply.response
        parts = await client.generate(model="llama3", prompt=prompt, stream=True, options=options)
        return "".join([part.response async for part in parts])

    async with ollama.AsyncClient(host=cluster.url, timeout=120) as client:
        asks = [
            asyncio.create_task(ask(client, p, stream=i % 2 == 0)) for i, p in enumerate(prompts)
        ]
        await fake.wait_until(lambda s: s["active"] == 4)
        pid = redis_server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # longer than every client's 10 s command timeout
        try:
            await asyncio.wait(asks, timeout=12)  # the stall itself, answers may finish
        finally:
            os.kill(pid, signal.SIGCONT)
        answers = await asyncio.gather(*asks)
    # Each answer whole, once: no chunk lost or repeated across the stall.
    assert answers == ["".join(echo_tokens(p, 40)[0]) for p in prompts]
    started = [entry["prompt"] for entry in fake.stats()["started"]]
    assert sorted(started) == sorted(prompts)  # each ran on the node exactly once
    stats = await redis.hgetall(keys.STATS)
    assert stats.get(b"enqueued") == b"6" and stats.get(b"done") == b"6"
    assert b"requeued" not in stats and b"retried" not in stats
    assert await redis.get(keys.queued_count("llama3:latest")) == b"0"


async def test_a_stream_pauses_while_redis_refuses_writes_and_then_completes(
    start_cluster: StartCluster, refusing_writes: Callable[[bool], Awaitable[None]]
) -> None:
    cluster = await start_cluster([FakeOllamaConfig(token_rate=10)])
    fake = cluster.nodes[0].fake.fake
    async with ollama.AsyncClient(host=cluster.url, timeout=60) as client:
        parts = await client.generate(
            model="llama3", prompt="keep going", stream=True, options={"num_predict": 30}
        )
        text = ""
        outage: asyncio.Task[None] | None = None
        async for part in parts:
            if outage is None:  # streaming has begun: refuse writes for 1.5 s
                await refusing_writes(True)
                await fake.wait_until(lambda s: s["active"] == 1)
                outage = asyncio.create_task(_refuse_for(1.5, refusing_writes))
            text += part.response
    assert outage is not None and outage.done()
    assert text == "".join(echo_tokens("keep going", 30)[0])


async def _refuse_for(seconds: float, refusing_writes: Callable[[bool], Awaitable[None]]) -> None:
    await asyncio.sleep(seconds)  # the length of the injected fault, not synchronisation
    await refusing_writes(False)


async def test_a_scheduler_taking_over_gives_stale_heartbeats_one_ttl(
    start_cluster: StartCluster, redis: Redis
) -> None:
    # As right after a Redis stall: a live node's last heartbeat looks older than the TTL
    # when a scheduler becomes active. It must wait a TTL, in which the node beats again.
    cluster = await start_cluster([FakeOllamaConfig(token_rate=20)], worker={"node_ttl": 2.0})
    node = cluster.nodes[0]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        asked = asyncio.create_task(
            http.post("/api/generate", json={**GENERATE, "options": {"num_predict": 60}})
        )
        await node.fake.fake.wait_until(lambda s: s["active"] == 1)
        await redis.zadd(keys.NODES, {node.node_id: 1.0})  # a heartbeat from long ago
        cluster.scheduler = LocalScheduler(cluster.redis_url, node_ttl=2.0)
        reply = await asked
    assert reply.status_code == 200 and reply.json()["response"].startswith("echo: hello")
    assert await redis.hget(keys.STATS, "requeued") is None  # never taken back
