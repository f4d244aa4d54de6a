"""Placement in a running fleet: circuit breakers, weights, backups, model locality and
forced runner options."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import ollama
import orjson
from redis.asyncio import Redis

from corral import keys
from corral.jobs import JobSpec, JobStore
from corral.keys import JobKind
from corral.tooling.cluster import LocalCluster, LocalNode
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import until, until_value

StartCluster = Callable[..., Awaitable[LocalCluster]]
MODEL = "llama3:latest"


async def _record(redis: Redis, node_id: str) -> dict[str, Any]:
    raw = await redis.get(keys.node(node_id))
    return orjson.loads(raw) if raw else {}


async def _breaker_state(redis: Redis, node_id: str) -> str:
    return str(((await _record(redis, node_id)).get("breaker") or {}).get("state"))


def _requests(node: LocalNode) -> int:
    return int(node.fake.fake.stats()["requests"].get("/api/generate", 0))


async def _sees_peers(node: LocalNode, count: int) -> None:
    """Wait until ``node`` has read ``count`` running peers' heartbeats (placement needs them)."""

    async def seen() -> int:
        return sum(1 for p in node.worker._peers if p.get("state") == "running")

    await until(seen, count, within=20)


# -- the claim script's minimum age -------------------------------------------------------


async def test_a_claim_with_a_minimum_age_leaves_younger_jobs_and_says_when(
    redis: Redis,
) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = JobSpec(
        kind=JobKind.GENERATE, model=MODEL, request=b'{"model":"llama3:latest","prompt":"x"}',
        priority=5, gateway_id="gw", stream=False, wait=False,
    )  # fmt: skip
    await store.enqueue(spec, max_queue=10)
    await redis.delete(keys.doorbell(MODEL))

    jobs, defer = await store.claim_aged(MODEL, "cold", 2, min_age=30.0)

    assert jobs == []
    assert defer is not None and 25.0 < defer <= 30.0
    assert await redis.llen(keys.doorbell(MODEL)) == 1, "rung again for a better node"
    assert await redis.hget(keys.job(spec.job_id), "state") == b"queued"
    jobs, defer = await store.claim_aged(MODEL, "warm", 2, min_age=0.0)
    assert [job.job_id for job in jobs] == [spec.job_id] and defer is None


# -- circuit breaker ---------------------------------------------------------------------


async def test_a_failing_node_opens_its_breaker_and_every_request_completes_elsewhere(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster(
        [
            FakeOllamaConfig(num_parallel=2, token_rate=200),
            FakeOllamaConfig(num_parallel=2, token_rate=200, fail_rate=1.0, fail_status=500),
        ],
        # Locality off: the failing node never loaded the model, and would otherwise
        # leave these short jobs to the warm node for good.
        worker={
            "breaker_failures": 2,
            "breaker_cooldown": 1.0,
            "spill_after": 0.2,
            "locality_wait": 0.0,
        },
        gateway={"max_attempts": 5},
        scheduler={"retry_base": 0.05, "retry_cap": 0.1},
    )
    good, bad = cluster.nodes
    await _sees_peers(bad, 2)
    async with ollama.AsyncClient(host=cluster.url) as client:
        replies = await asyncio.gather(
            *(client.generate(model="llama3", prompt=f"job {i}") for i in range(20))
        )
        assert [r.response for r in replies] == [f"echo: job {i}" for i in range(20)]
        assert good.fake.fake.stats()["completed"] == 20
        await until(lambda: _breaker_state(redis, bad.node_id), "open", within=10)

        # Open: the node claims nothing, and nothing shows it healthy.
        record = await _record(redis, bad.node_id)
        assert record["state"] == "breaker-open"
        assert record["breaker"]["trips"] >= 1
        async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
            nodes = (await http.get("/nodes")).json()["nodes"]
            shown = {n["node_id"]: n for n in nodes}
            assert shown[bad.node_id]["breaker"]["state"] in ("open", "half-open")
            metrics = (await http.get("/metrics")).text
        assert f'corral_node_breaker_open{{node="{bad.node_id}"}} 1.0' in metrics

        # The node recovers: after the cool-down one probe job succeeds and closes it.
        bad.fake.fake.configure(fail_rate=0.0)
        deadline = time.monotonic() + 30
        while await _breaker_state(redis, bad.node_id) != "closed":
            assert time.monotonic() < deadline, "the breaker never closed"
            await client.generate(model="llama3", prompt="after")
        assert bad.fake.fake.stats()["completed"] >= 1
    assert (await _record(redis, bad.node_id))["state"] == "running"


async def test_an_open_breaker_stops_claims_until_its_cooldown(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=1, fail_rate=1.0, fail_status=500)],
        worker={"breaker_failures": 1, "breaker_cooldown": 60.0},
        gateway={"max_attempts": 5},
        scheduler={"retry_base": 0.05, "retry_cap": 0.1},
    )
    node = cluster.nodes[0]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        reply = await http.post(
            "/jobs",
            json={"kind": "generate", "wait": False, "request": {"model": "llama3", "prompt": "x"}},
        )
        job_id = reply.json()["id"]
        await until(lambda: _breaker_state(redis, node.node_id), "open", within=10)
        assert _requests(node) == 1
        # The retry is back in the queue, and the node answers again; an open breaker
        # still must not claim it. A claim would come within one doorbell timeout (1 s):
        # watch for three seconds of the node's heartbeats (Redis's clock).
        node.fake.fake.configure(fail_rate=0.0)
        await until(lambda: _state(http, job_id), "queued", within=10)
        since = float((await _record(redis, node.node_id))["ts"])

        async def heartbeats_past() -> bool:
            return float((await _record(redis, node.node_id))["ts"]) > since + 3.0

        await until(heartbeats_past, True, within=20)
        assert _requests(node) == 1
        assert await _state(http, job_id) == "queued"
        assert (await _record(redis, node.node_id))["state"] == "breaker-open"


async def _state(http: httpx.AsyncClient, job_id: str) -> str:
    return str((await http.get(f"/jobs/{job_id}")).json()["state"])


# -- weights, backups, locality ------------------------------------------------------------


async def _one_at_a_time(cluster: LocalCluster, count: int, model: str = "llama3") -> None:
    async with ollama.AsyncClient(host=cluster.url) as client:
        for i in range(count):
            reply = await client.generate(model=model, prompt=f"one {i}")
            assert reply.response == f"echo: one {i}"


def _completed(node: LocalNode) -> int:
    return int(node.fake.fake.stats()["completed"])


async def test_the_heavier_node_takes_the_jobs_while_it_has_a_free_slot(
    start_cluster: StartCluster,
) -> None:
    # Both nodes free, both with the model loaded: without weights each request goes to
    # whichever node wins the doorbell (about half each).
    config = FakeOllamaConfig(num_parallel=1, preloaded=[MODEL])
    cluster = await start_cluster([config], worker={"weight": 10, "weight_step": 2.0})
    light = await cluster.add_node(config, weight=1, weight_step=2.0, heartbeat_interval=0.5)
    heavy = cluster.nodes[0]
    await _sees_peers(light, 2)
    await _one_at_a_time(cluster, 12)
    # A heartbeat read while the heavy node ran a job shows it busy: at most one such
    # miss is allowed for (the chance of 11 or 12 of 12 without weights is 0.3 %).
    assert _completed(heavy) >= 11 and _completed(heavy) + _completed(light) == 12


async def test_a_backup_takes_jobs_only_once_the_primaries_are_saturated(
    start_cluster: StartCluster,
) -> None:
    config = FakeOllamaConfig(num_parallel=1, preloaded=[MODEL], token_rate=40)
    cluster = await start_cluster([config])
    backup = await cluster.add_node(config, backup=True, spill_after=5.0)
    primary = cluster.nodes[0]
    await _sees_peers(backup, 2)
    await _one_at_a_time(cluster, 6)
    assert _completed(primary) >= 5  # (one heartbeat read mid-job allowed for)
    before = _completed(backup)

    # Saturated: six jobs of ~0.2 s at once on a one-slot primary. The backup takes
    # some once a heartbeat shows the primary busy, or once a job waited 5 s.
    async with ollama.AsyncClient(host=cluster.url) as client:
        replies = await asyncio.gather(
            *(client.generate(model="llama3", prompt=f"burst {i} a b c d e f") for i in range(6))
        )
    assert len(replies) == 6
    assert _completed(backup) > before


async def test_a_cold_node_leaves_short_jobs_to_the_node_with_the_model_loaded(
    start_cluster: StartCluster,
) -> None:
    warm_config = FakeOllamaConfig(num_parallel=1, preloaded=[MODEL])
    cluster = await start_cluster([warm_config], worker={"load_cost": 5.0})
    cold = await cluster.add_node(FakeOllamaConfig(num_parallel=1, load_delay=0.3))
    warm = cluster.nodes[0]
    await _sees_peers(cold, 2)
    await _one_at_a_time(cluster, 12)
    assert _completed(warm) == 12
    assert cold.fake.fake.stats()["loads"] == 0


async def test_a_cold_node_loads_the_model_when_the_warm_backlog_outlasts_a_load(
    start_cluster: StartCluster,
) -> None:
    warm_config = FakeOllamaConfig(num_parallel=1, preloaded=[MODEL], token_rate=20)
    cluster = await start_cluster([warm_config])
    cold = await cluster.add_node(FakeOllamaConfig(num_parallel=1, load_delay=0.2), load_cost=0.3)
    await _sees_peers(cold, 2)
    async with ollama.AsyncClient(host=cluster.url) as client:
        await asyncio.gather(
            *(client.generate(model="llama3", prompt=f"slow {i} a b c d e") for i in range(6))
        )
    # Each job takes the warm node ~0.4 s: its backlog outlasts the 0.3 s load cost.
    assert _completed(cold) >= 1
    assert cold.fake.fake.stats()["loads"] == 1
    record = cold.worker.record()
    assert 0 < record["load_costs"].get(MODEL, 0) < 1.0  # measured from load_duration


async def test_a_model_warm_nowhere_is_loaded_by_one_node_not_by_every_free_one(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cold = FakeOllamaConfig(num_parallel=2, load_delay=2.0)
    cluster = await start_cluster([cold, cold])
    for node in cluster.nodes:
        await _sees_peers(node, 2)
    async with ollama.AsyncClient(host=cluster.url) as client:
        first = asyncio.create_task(client.generate(model="llama3", prompt="first"))
        # One node claimed it and is loading the model (2 s): it says so in Redis.
        loader = await until_value(lambda: redis.get(keys.loading(MODEL)))
        # The other node, with free slots, leaves these to the loader instead of loading too.
        rest = await asyncio.gather(
            *(client.generate(model="llama3", prompt=f"next {i}") for i in range(3))
        )
        await first
    assert len(rest) == 3
    loads = {node.node_id: node.fake.fake.stats()["loads"] for node in cluster.nodes}
    assert loads == {n.node_id: int(n.node_id == loader.decode()) for n in cluster.nodes}


async def test_a_node_knows_what_its_load_evicted_before_the_next_refresh(
    start_cluster: StartCluster,
) -> None:
    # One model at a time; /api/ps is read every 30 s only (the heartbeat interval).
    config = FakeOllamaConfig(
        num_parallel=1, max_loaded_models=1, preloaded=["qwen2:0.5b"], load_delay=0.2
    )
    cluster = await start_cluster([config], worker={"heartbeat_interval": 30, "node_ttl": 90})
    worker = cluster.nodes[0].worker
    assert worker._loaded_names() == {"qwen2:0.5b"}
    async with ollama.AsyncClient(host=cluster.url) as client:
        await client.generate(model="llama3", prompt="evicts qwen2")

    async def loaded() -> set[str]:
        return worker._loaded_names()

    # Claiming the job counted llama3 as loaded; the load's answer had /api/ps read again,
    # which shows qwen2 evicted: its jobs are no longer taken here as warm.
    await until(loaded, {MODEL}, within=5)


async def test_a_node_that_holds_several_models_keeps_them_while_it_loads_another(
    start_cluster: StartCluster,
) -> None:
    # Two models loaded at once: Ollama holds several, so a third load need not evict
    # them, and the node keeps taking their jobs as warm while it loads.
    config = FakeOllamaConfig(
        models=[MODEL, "qwen2:0.5b", "mistral:latest"],
        num_parallel=1,
        max_loaded_models=3,
        preloaded=["qwen2:0.5b", MODEL],
        load_delay=2.0,
    )
    cluster = await start_cluster([config], worker={"heartbeat_interval": 30, "node_ttl": 90})
    worker = cluster.nodes[0].worker
    assert worker._loaded_names() == {"qwen2:0.5b", MODEL}

    async def loading_mistral() -> bool:
        return "mistral:latest" in worker._loaded_names()

    async with ollama.AsyncClient(host=cluster.url) as client:
        load = asyncio.create_task(client.generate(model="mistral", prompt="a third"))
        await until(loading_mistral, True, within=5)
        assert not load.done()  # claimed, still loading (2 s)
        assert worker._loaded_names() == {"qwen2:0.5b", MODEL, "mistral:latest"}
        await load


async def test_forced_runner_options_stop_reloads_between_clients_that_differ_there(
    start_cluster: StartCluster,
) -> None:
    forced = '{"llama3": {"num_ctx": 2048}}'
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=1)], worker={"model_options": forced}
    )
    fake = cluster.nodes[0].fake.fake
    async with ollama.AsyncClient(host=cluster.url) as client:
        for num_ctx in (4096, 8192, None, 1024):
            options = {"num_ctx": num_ctx} if num_ctx else None
            await client.generate(model="llama3", prompt="ctx", options=options)
    assert fake.stats()["loads"] == 1


# -- embedding micro-batching --------------------------------------------------------------


async def test_embed_jobs_claimed_together_go_to_ollama_as_one_call(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster([])
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    model = "nomic-embed-text:latest"
    bodies: list[dict[str, Any]] = [
        {"model": model, "input": "alpha"},
        {"model": model, "input": ["beta", "gamma"]},
        {"model": model, "input": "delta"},
        {"model": model, "input": "epsilon", "truncate": False},  # another batch
    ]
    specs = [
        JobSpec(
            kind=JobKind.EMBED,
            model=model,
            request=orjson.dumps(body),
            priority=5,
            gateway_id="gw",
            stream=False,
            wait=False,
        )
        for body in bodies
    ]
    for spec in specs:
        await store.enqueue(spec, max_queue=10)
    node = await cluster.add_node(FakeOllamaConfig(num_parallel=4))  # claims all four at once

    async def all_done() -> bool:
        states = [await redis.hget(keys.job(s.job_id), "state") for s in specs]
        return states == [b"done"] * len(specs)

    await until(all_done, True, within=20)
    fake = node.fake.fake
    assert fake.stats()["requests"]["/api/embed"] == 2  # three jobs in one call, one alone
    results = [orjson.loads(await redis.hget(keys.job(s.job_id), "result")) for s in specs]
    async with httpx.AsyncClient(base_url=node.fake.url, timeout=10) as direct:
        for body, result in zip(bodies, results, strict=True):
            alone = (await direct.post("/api/embed", json=body)).json()
            assert result["embeddings"] == alone["embeddings"]
            assert result["model"] == model


# -- tail-aware claims ----------------------------------------------------------------------


async def test_a_slow_node_takes_a_short_backlog_that_a_hung_faster_node_leaves(
    start_cluster: StartCluster,
) -> None:
    fast_config = FakeOllamaConfig(num_parallel=1, token_rate=400, preloaded=[MODEL])
    cluster = await start_cluster([fast_config])
    slow = await cluster.add_node(
        FakeOllamaConfig(num_parallel=1, token_rate=40, preloaded=[MODEL])
    )
    fast = cluster.nodes[0]
    words = "a b c d e f g h i j"
    async with ollama.AsyncClient(host=cluster.url) as client:
        # Both nodes measure their speed on a first batch.
        await asyncio.gather(
            *(client.generate(model="llama3", prompt=f"{i} {words}") for i in range(8))
        )

        async def knows_fast_is_faster() -> bool:
            return slow.worker.placement.tail_threshold(MODEL, slow.worker._peers) > 0

        await until(knows_fast_is_faster, True, within=20)
        fast.fake.fake.configure(hang=True)
        before = _requests(fast)
        first = asyncio.create_task(client.generate(model="llama3", prompt="held"))
        await fast.fake.fake.wait_until(lambda s: s["requests"]["/api/generate"] > before)
        # The fast node holds its only slot forever; the slow node leaves it this one-job
        # backlog at first, then takes it when the backlog does not move.
        reply = await asyncio.wait_for(client.generate(model="llama3", prompt="next"), 30)
        assert reply.response == "echo: next"
        first.cancel()
