"""Fleet behaviour: slots are never exceeded, priorities order work, models route, and
clients that leave cancel their jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import ollama
from redis.asyncio import Redis

from corral import keys
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import until

StartCluster = Callable[..., Awaitable[LocalCluster]]


async def test_slots_never_exceeded_with_50_concurrent_requests(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(
        [
            FakeOllamaConfig(num_parallel=2, token_rate=400),
            FakeOllamaConfig(num_parallel=2, token_rate=400),
        ]
    )
    async with ollama.AsyncClient(host=cluster.url) as client:
        replies = await asyncio.gather(
            *(client.generate(model="llama3", prompt=f"job {i} a b c d") for i in range(50))
        )
    assert [r.response for r in replies] == [f"echo: job {i} a b c d" for i in range(50)]
    stats = [node.fake.fake.stats() for node in cluster.nodes]
    assert [s["max_active"] for s in stats] == [2, 2]  # both nodes were full, never over
    assert sum(s["completed"] for s in stats) == 50


async def test_high_priority_starts_before_a_backlog_of_low_priority(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster([FakeOllamaConfig(num_parallel=1, token_rate=200)])
    fake = cluster.nodes[0].fake.fake
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        blocker = await _submit(http, "blocker", priority=5, num_predict=40)
        await fake.wait_until(lambda s: s["active"] == 1)
        low = [await _submit(http, f"low {i}", priority=9) for i in range(5)]
        high = await _submit(http, "urgent", priority=0)
        for job_id in [blocker, *low, high]:
            await _wait_state(http, job_id, "done")
    order = [entry["prompt"] for entry in fake.stats()["started"]]
    assert order[:2] == ["blocker", "urgent"]
    assert order[2:] == [f"low {i}" for i in range(5)]  # FIFO within a priority


async def test_nodes_only_get_models_they_have(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(models=["llama3:latest"]), FakeOllamaConfig(models=["qwen2:0.5b"])]
    )
    llama_node, qwen_node = (node.fake.fake for node in cluster.nodes)
    async with ollama.AsyncClient(host=cluster.url) as client:
        await asyncio.gather(
            *(client.generate(model="qwen2:0.5b", prompt=f"q{i}") for i in range(10))
        )
        await asyncio.gather(*(client.generate(model="llama3", prompt=f"l{i}") for i in range(10)))
        assert "qwen2:0.5b" not in _models_started(llama_node)
        assert "llama3:latest" not in _models_started(qwen_node)
        assert qwen_node.stats()["completed"] == 10 and llama_node.stats()["completed"] == 10

        await cluster.nodes[1].stop()  # the only node with qwen2 leaves the fleet
        await cluster.gateway.state.fleet.refresh()  # type: ignore[union-attr]
        try:
            await client.generate(model="qwen2:0.5b", prompt="anyone?")
        except ollama.ResponseError as exc:
            assert exc.status_code == 404
        else:
            raise AssertionError("a model on no live node must be a 404")
    cluster.nodes.pop()


async def test_client_disconnect_mid_stream_frees_the_slot_within_a_second(
    cluster: LocalCluster, redis: Redis
) -> None:
    fake = cluster.nodes[0].fake.fake
    body = {"model": "llama3", "prompt": "long story", "options": {"num_predict": 500}}
    fake.configure(token_rate=20)
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=10) as http,
        http.stream("POST", "/api/generate", json=body) as response,
    ):
        job_id = response.headers["x-corral-job-id"]
        lines = response.aiter_lines()
        assert '"done":false' in (await anext(lines)).replace(" ", "")
        assert fake.stats()["active"] == 1
        # leaving the block closes the connection: the client has gone
    # The slot is free (and the fake saw its client, our worker, go away) within 1 s.
    stats = await fake.wait_until(lambda s: s["active"] == 0 and s["disconnects"] == 1, within=1.0)
    assert stats["completed"] == 0
    assert await redis.hget(keys.job(job_id), "state") == b"cancelled"


async def test_queued_job_of_a_departed_client_never_runs(start_cluster: StartCluster) -> None:
    cluster = await start_cluster([FakeOllamaConfig(num_parallel=1, token_rate=100)])
    fake = cluster.nodes[0].fake.fake
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        blocker = await _submit(http, "blocker", priority=5, num_predict=30)
        await fake.wait_until(lambda s: s["active"] == 1)
        gone = asyncio.create_task(
            http.post("/api/generate", json={"model": "llama3", "prompt": "gone", "stream": False})
        )
        redis = cluster.gateway.state.redis  # type: ignore[union-attr]
        await until(lambda: redis.get(keys.queued_count("llama3:latest")), b"1")
        gone.cancel()  # the client hangs up while its job is queued
        await asyncio.wait([gone])
        after = await _submit(http, "after", priority=5)
        await _wait_state(http, blocker, "done")
        await _wait_state(http, after, "done")
    prompts = [entry["prompt"] for entry in fake.stats()["started"]]
    assert prompts == ["blocker", "after"]


async def test_native_job_api_submit_fetch_cancel(start_cluster: StartCluster) -> None:
    cluster = await start_cluster([FakeOllamaConfig(num_parallel=1, token_rate=100)])
    fake = cluster.nodes[0].fake.fake
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        waited = await http.post(
            "/jobs", json={"kind": "generate", "request": {"model": "llama3", "prompt": "hi"}}
        )
        assert waited.status_code == 200
        assert waited.json()["result"]["response"] == "echo: hi"
        blocker = await _submit(http, "blocker", priority=5, num_predict=30)
        await fake.wait_until(lambda s: s["active"] == 1)
        queued = await _submit(http, "cancel me", priority=5)
        assert (await http.get(f"/jobs/{queued}")).json()["state"] == "queued"
        cancelled = await http.delete(f"/jobs/{queued}")
        assert cancelled.json() == {"id": queued, "state": "cancelled", "was": "queued"}
        assert (await http.delete(f"/jobs/{queued}")).status_code == 409
        assert (await http.get("/jobs/unknown")).status_code == 404
        done = await _wait_state(http, blocker, "done")
        assert done["result"]["response"].startswith("echo:")
        assert done["node"] == "node1" and done["attempts"] == 1
    assert "cancel me" not in [entry["prompt"] for entry in fake.stats()["started"]]


async def _submit(
    http: httpx.AsyncClient, prompt: str, *, priority: int, num_predict: int = 0
) -> str:
    request: dict[str, Any] = {"model": "llama3", "prompt": prompt}
    if num_predict:
        request["options"] = {"num_predict": num_predict}
    response = await http.post(
        "/jobs", json={"kind": "generate", "request": request, "priority": priority, "wait": False}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def _wait_state(http: httpx.AsyncClient, job_id: str, state: str) -> dict[str, Any]:
    async def current() -> str:
        return str((await http.get(f"/jobs/{job_id}")).json()["state"])

    await until(current, state)
    view: dict[str, Any] = (await http.get(f"/jobs/{job_id}")).json()
    return view


def _models_started(fake: Any) -> set[str]:
    return {entry["model"] for entry in fake.stats()["started"]}
