"""Nothing is lost: retries with backoff through RQ, dead letters and their requeue, dead
node reclaim, poison jobs, deadlines, orphans, pub/sub loss and scheduler failover."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import ollama
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from rq import Queue
from rq.registry import FailedJobRegistry

from corral import fleet, keys
from corral.jobs import JobStore
from corral.loops import Backoff
from corral.rqjson import SERIALIZER
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from corral.tooling.redis_proc import free_port
from tests.helpers import until

StartCluster = Callable[..., Awaitable[LocalCluster]]
GENERATE = {"model": "llama3", "prompt": "try again", "stream": False}


async def _job_state(redis: Redis, job_id: str) -> str:
    state = await redis.hget(keys.job(job_id), "state")
    return state.decode() if state else ""


async def test_retriable_failure_is_retried_with_backoff(
    start_cluster: StartCluster, redis: Redis
) -> None:
    # RQ schedules at whole seconds, so the backoff under test is seconds long.
    cluster = await start_cluster(
        [FakeOllamaConfig(fail_next=1)], scheduler={"retry_base": 3.0, "retry_cap": 3.0}
    )
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        reply = await http.post("/api/generate", json=GENERATE)
        assert reply.status_code == 200 and reply.json()["response"] == "echo: try again"
        job = (await http.get(f"/jobs/{reply.headers['x-corral-job-id']}")).json()
    assert job["state"] == "done" and job["attempts"] == 2
    assert [h["status"] for h in job["history"]] == [500]
    record = await redis.hmget(keys.job(job["id"]), "retry_since", "requeued")
    waited = float(record[1]) - float(record[0])
    assert waited >= 0.5  # equal jitter: 1.5-3 s, less at most 1 s of RQ's rounding


def test_backoff_is_exponential_capped_and_jittered() -> None:
    backoff = Backoff(base=1.0, cap=8.0)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # really jittered


async def test_non_retriable_failure_fails_at_once(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster([FakeOllamaConfig(fail_next=1, fail_status=400)], scheduler={})
    async with ollama.AsyncClient(host=cluster.url) as client:
        with pytest.raises(ollama.ResponseError) as failure:
            await client.generate(model="llama3", prompt="x")
    assert failure.value.status_code == 400
    assert await redis.llen(keys.RETRY_INBOX) == 0
    assert await redis.hget(keys.STATS, "retried") is None


async def test_dead_letter_after_attempts_then_requeue_completes(
    start_cluster: StartCluster, redis: Redis, redis_url: str
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(fail_next=100)],
        gateway={"max_attempts": 2},  # written into each job: every path enforces it
        scheduler={"retry_base": 0.05, "retry_cap": 0.05},
    )
    fake = cluster.nodes[0].fake.fake
    async with ollama.AsyncClient(host=cluster.url) as client:
        with pytest.raises(ollama.ResponseError) as failure:
            await client.generate(model="llama3", prompt="doomed")
    assert failure.value.status_code == 503
    assert "gave up after 2 attempt(s)" in failure.value.error
    assert "injected failure" in failure.value.error  # the last backend reason, named
    registry = FailedJobRegistry(
        queue=Queue(
            keys.RETRY_QUEUE, connection=SyncRedis.from_url(redis_url), serializer=SERIALIZER
        )
    )
    await until(lambda: _dead_letter_count(registry), 1)  # filed just after the client heard
    letters = registry.get_job_ids()
    from rq.job import Job

    letter = Job.fetch(letters[0], connection=registry.connection, serializer=SERIALIZER)
    job_id = letter.meta["corral_job"]
    assert await _job_state(redis, job_id) == "dead"
    # Dead-lettered jobs no longer count as scheduled retries (corral_retry_scheduled_jobs).
    assert await redis.zcard(keys.RETRY_SCHEDULED) == 0
    history = letter.latest_result().exc_string  # type: ignore[union-attr]
    assert "DeadLetter" in history and history.count('"status":500') == 2

    fake.configure(fail_next=0)
    retried = subprocess.run(
        [sys.executable, "-m", "corral.cli", "dlq", "--redis-url", redis_url, "retry", job_id],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert retried.returncode == 0, retried.stderr
    await until(lambda: _job_state(redis, job_id), "done")
    view = await JobStore(redis, job_ttl=60, result_ttl=60).get(job_id)
    assert view is not None and view["result"]["response"] == "echo: doomed"
    registry.connection.close()


async def test_dead_worker_jobs_are_reclaimed_at_once(
    start_cluster: StartCluster, redis: Redis
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], scheduler={"node_ttl": 1.0})
    await cluster.nodes[0].stop()  # the live node leaves so that the ghost claims the job
    cluster.nodes.clear()
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    await fleet.publish_heartbeat(redis, _node_record("keeper"), 60)  # keeps llama3 routable
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        submitted = await http.post(
            "/jobs", json={"kind": "generate", "wait": False, "request": GENERATE}
        )
    job_id = submitted.json()["id"]
    ghost = await _ghost_claim(store, redis, "ghost")  # a node that claims, then vanishes
    assert ghost.job_id == job_id
    replacement = await cluster.add_node(FakeOllamaConfig(), node_id="fresh")
    await until(lambda: _job_state(redis, job_id), "done", within=5)
    view = await store.get(job_id)
    assert view is not None and view["node"] == "fresh" and view["attempts"] == 2
    assert view["history"][0]["error"] == "node ghost died"
    assert replacement.fake.fake.stats()["completed"] == 1


async def test_poison_job_is_dead_lettered(start_cluster: StartCluster, redis: Redis) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig()], gateway={"max_attempts": 2}, scheduler={"node_ttl": 0.5}
    )
    await cluster.nodes[0].stop()
    cluster.nodes.clear()
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        await fleet.publish_heartbeat(redis, _node_record("keeper"), 60)  # keeps llama3 routable
        again = await http.post(
            "/jobs", json={"kind": "generate", "wait": False, "request": GENERATE}
        )
        job_id = again.json()["id"]
    for name in ("crash-1", "crash-2"):  # every node that takes it dies
        claimed = await _ghost_claim(store, redis, name)
        assert claimed.job_id == job_id
        await until(lambda: _job_state(redis, job_id), "queued" if name == "crash-1" else "dead")
    view = await store.get(job_id)
    assert view is not None and view["attempts"] == 2
    assert [h["node"] for h in view["history"]] == ["crash-1", "crash-2"]


async def test_deadline_expiry(start_cluster: StartCluster, redis: Redis) -> None:
    cluster = await start_cluster([FakeOllamaConfig(num_parallel=1, token_rate=100)])
    fake = cluster.nodes[0].fake.fake
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        blocker = {"kind": "generate", "wait": False,
                   "request": {**GENERATE, "options": {"num_predict": 40}}}  # fmt: skip
        await http.post("/jobs", json=blocker)
        await fake.wait_until(lambda s: s["active"] == 1)
        waited = await http.post(
            "/api/generate",
            json={**GENERATE, "prompt": "in time?"},
            headers={"X-Corral-Timeout": "0.2"},
        )
        assert waited.status_code == 504
        assert "timed out after 0.2s" in waited.json()["error"]
        assert await _job_state(redis, waited.headers["x-corral-job-id"]) == "expired"
        background = await http.post(
            "/jobs",
            json={"kind": "generate", "wait": False, "timeout": 0.1,
                  "request": {**GENERATE, "prompt": "too late"}},
        )  # fmt: skip
        late = background.json()["id"]
        await until(lambda: _job_state(redis, late), "expired", within=5)
        view = (await http.get(f"/jobs/{late}")).json()
        assert view["status"] == 408 and "expired" in view["error"]
    assert {"in time?", "too late"}.isdisjoint(e["prompt"] for e in fake.stats()["started"])


async def test_orphaned_jobs_are_cancelled_unless_wait_false(
    start_cluster: StartCluster, redis: Redis, redis_url: str
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=1, token_rate=100)],
        gateway={"fleet_refresh": 0.2},
        worker={"gateway_ttl": 1.0},
    )
    fake = cluster.nodes[0].fake.fake
    port = free_port()
    doomed = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "gateway", "--redis-url", redis_url,
         "--port", str(port), "--fleet-refresh", "0.2", "--gateway-id", "doomed"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            await until(lambda: _healthy(http), True, within=20)
            # The blocker holds the node's one slot until the dead gateway's heartbeat is
            # past the 1 s gateway TTL (however slow the machine), then it is cancelled.
            slow = {**GENERATE, "prompt": "blocker", "options": {"num_predict": 6000}}
            blocker = await http.post(
                "/jobs", json={"kind": "generate", "wait": False, "request": slow}
            )
            await fake.wait_until(lambda s: s["active"] == 1)
            kept = await http.post(
                "/jobs",
                json={"kind": "generate", "wait": False, "request": {**GENERATE, "prompt": "kept"}},
            )
            waiting = asyncio.create_task(
                http.post("/api/generate", json={**GENERATE, "prompt": "orphan"})
            )
            await until(lambda: redis.get(keys.queued_count("llama3:latest")), b"2")
            doomed.kill()  # the gateway dies: its waiting client can never get an answer
            await asyncio.wait([waiting])
    finally:
        doomed.kill()
        doomed.wait(10)
    await until(lambda: _heartbeat_age(redis, "doomed"), True, within=20)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        cancelled = await http.delete(f"/jobs/{blocker.json()['id']}")
        assert cancelled.status_code == 200, cancelled.text
    kept_id = kept.json()["id"]
    await until(lambda: _job_state(redis, kept_id), "done", within=10)
    assert [e["prompt"] for e in fake.stats()["started"]] == ["blocker", "kept"]
    assert await redis.hget(keys.STATS, "orphaned") == b"1"
    records = [await redis.hgetall(key) async for key in redis.scan_iter("corral:job:*")]
    orphans = [r for r in records if r.get(b"error", b"").startswith(b"orphaned")]
    assert len(orphans) == 1
    assert (orphans[0][b"state"], orphans[0][b"status"]) == (b"cancelled", b"503"), [
        (r[b"error"], r.get(b"status")) for r in orphans
    ]


async def _heartbeat_age(redis: Redis, gateway_id: str) -> bool:
    """Whether the gateway's last heartbeat is over 1.5 s old on Redis's clock."""
    seen = await redis.zscore(keys.GATEWAYS, gateway_id)
    now, micros = await redis.time()
    return seen is None or now + micros / 1e6 - seen > 1.5


async def _healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_reply_stream_survives_losing_pubsub(cluster: LocalCluster, redis: Redis) -> None:
    fake = cluster.nodes[0].fake.fake
    fake.configure(token_rate=50)
    words = " ".join(f"w{i}" for i in range(30))
    body = {"model": "llama3", "prompt": words}
    received: list[str] = []
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
        http.stream("POST", "/api/generate", json=body) as response,
    ):
        killed = False
        async for line in response.aiter_lines():
            received.append(line)
            if len(received) == 5 and not killed:
                await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                killed = True
    import json

    parts = [json.loads(line) for line in received if line]
    assert "".join(p.get("response", "") for p in parts) == f"echo: {words}"
    assert [p["done"] for p in parts].count(True) == 1 and parts[-1]["done"]


async def test_scheduler_failover(redis_url: str, redis: Redis) -> None:
    command = [sys.executable, "-m", "corral.cli", "scheduler", "--redis-url", redis_url,
               "--lease-ttl", "1", "--interval", "0.2", "--no-rq-worker"]  # fmt: skip
    first = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        await until(lambda: _lease_pid(redis), first.pid, within=15)
        second = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        try:
            await asyncio.sleep(0.5)  # let the second run a few passes as the stand-by
            assert await _lease_pid(redis) == first.pid
            killed_at = time.monotonic()
            os.kill(first.pid, signal.SIGKILL)
            await until(lambda: _lease_pid(redis), second.pid, within=5)
            assert time.monotonic() - killed_at < 3
        finally:
            second.terminate()
            second.wait(10)
    finally:
        first.kill()
        first.wait(10)


async def _dead_letter_count(registry: FailedJobRegistry) -> int:
    return len(await asyncio.to_thread(registry.get_job_ids))


async def _lease_pid(redis: Redis) -> int | None:
    holder = await redis.get(keys.SCHEDULER_LEASE)
    return int(holder.decode().split("-")[-2]) if holder else None


def _node_record(node_id: str) -> dict[str, Any]:
    return {"node_id": node_id, "state": "running", "models": [{"name": "llama3:latest"}]}


async def _ghost_claim(store: JobStore, redis: Redis, node_id: str) -> Any:
    """Claim as a node that then dies at once: its heartbeat is already stale."""

    async def claim() -> Any:
        return await store.claim("llama3:latest", node_id)

    claimed = None
    async with asyncio.timeout(5):
        while (claimed := await claim()) is None:  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.01)
    await redis.zadd(keys.NODES, {node_id: time.time() - 3600})
    return claimed


async def test_node_failing_mid_stream_ends_the_stream_with_an_error_line(
    start_cluster: StartCluster, redis: Redis
) -> None:
    """With CORRAL_RESUME_STREAMS off, output already reached the client: the job fails
    with Ollama's mid-stream error convention instead of being continued (tests/
    test_resume.py covers the default, where another attempt continues the answer)."""
    import json

    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=2)], worker={"resume_streams": False}
    )
    cluster.nodes[0].fake.fake.configure(crash_after_tokens=2, token_rate=100)
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
        http.stream(
            "POST", "/api/generate", json={"model": "llama3", "prompt": "a b c d"}
        ) as reply,
    ):
        assert reply.status_code == 200
        lines = [json.loads(line) async for line in reply.aiter_lines() if line]
        job_id = reply.headers["x-corral-job-id"]
    assert [line.get("response") for line in lines[:2]] == ["echo: ", "a "]
    assert "error" in lines[-1] and len(lines) == 3
    assert await _job_state(redis, job_id) == "failed"
    assert await redis.hget(keys.STATS, "retried") is None


async def test_restarted_worker_hands_back_what_its_predecessor_held(
    start_cluster: StartCluster, redis: Redis
) -> None:
    """A worker killed and restarted under the same id faster than the node TTL is never
    seen dead by the scheduler: the new process must hand back the old one's claims."""
    cluster = await start_cluster([FakeOllamaConfig(num_parallel=1)])
    node = cluster.nodes[0]
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        node.worker.request_stop()  # stop claiming so the "previous process" can claim
        await asyncio.wait([node.task])
        submitted = await http.post(
            "/jobs", json={"kind": "generate", "wait": False, "request": GENERATE}
        )
        job_id = submitted.json()["id"]
        stranded = await store.claim("llama3:latest", "node1")  # then that process died
        assert stranded is not None and stranded.job_id == job_id
        restarted = await cluster.add_node(FakeOllamaConfig(), node_id="node1")
        restarted.worker.stranded_after = 0
        assert await restarted.worker.reclaim_stranded() == 1
        await until(lambda: _job_state(redis, job_id), "done")
    view = await store.get(job_id)
    assert view is not None and view["attempts"] == 2 and view["node"] == "node1"


async def test_rq_dashboard_requeue_sends_a_dead_job_back_through_the_fleet(
    start_cluster: StartCluster, redis: Redis, redis_url: str
) -> None:
    import rq_dashboard
    from flask import Flask
    from rq.job import Job

    cluster = await start_cluster(
        [FakeOllamaConfig(fail_next=100)],
        gateway={"max_attempts": 1},
        scheduler={"retry_base": 0.05, "retry_cap": 0.05},
    )
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        submitted = await http.post(
            "/jobs", json={"kind": "generate", "wait": False, "request": GENERATE}
        )
    job_id = submitted.json()["id"]
    await until(lambda: _job_state(redis, job_id), "dead")
    sync = SyncRedis.from_url(redis_url)
    registry = FailedJobRegistry(
        queue=Queue(keys.RETRY_QUEUE, connection=sync, serializer=SERIALIZER)
    )
    await until(lambda: _dead_letter_count(registry), 1)
    rq_id = registry.get_job_ids()[0]
    assert Job.fetch(rq_id, connection=sync, serializer=SERIALIZER).meta["corral_job"] == job_id

    app = Flask("dashboard")
    app.config.from_object(rq_dashboard.default_settings)
    app.config["RQ_DASHBOARD_REDIS_URL"] = redis_url
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
    rq_dashboard.web.setup_rq_connection(app)  # what `rq-dashboard` does at start-up
    cluster.nodes[0].fake.fake.configure(fail_next=0)
    pressed = await asyncio.to_thread(app.test_client().post, f"/rq/job/{rq_id}/requeue")
    assert pressed.status_code == 200  # the dashboard's Requeue button
    await until(lambda: _job_state(redis, job_id), "done")
    view = await JobStore(redis, job_ttl=60, result_ttl=60).get(job_id)
    assert view is not None and view["result"]["response"] == "echo: try again"
    sync.close()


async def test_a_retry_whose_rq_job_was_lost_is_scheduled_again(
    redis: Redis, redis_url: str
) -> None:
    from rq.job import Job, JobStatus

    from corral.jobs import JobSpec
    from corral.keys import JobKind
    from corral.scheduler.retries import LOST_AFTER, RetryScheduler, rq_job_id

    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = JobSpec(
        kind=JobKind.GENERATE, model="llama3:latest", request=b"{}", priority=5,
        gateway_id="gw", stream=False, wait=False,
    )  # fmt: skip
    await store.enqueue(spec, max_queue=10)
    claimed = await store.claim("llama3:latest", "node-a")
    assert claimed is not None and await store.retry(claimed, "node-a", "boom", 500)
    sync = SyncRedis.from_url(redis_url)
    retries = RetryScheduler(
        redis, Queue(keys.RETRY_QUEUE, connection=sync, serializer=SERIALIZER), Backoff(1.0, 1.0),
        max_attempts=3, job_ttl=60, result_ttl=60,
    )  # fmt: skip
    # A pass that died after taking the id still has it in the processing list.
    await redis.lmove(keys.RETRY_INBOX, keys.RETRY_PROCESSING, "LEFT", "RIGHT")
    assert await retries.drain() == 1
    rq_id = rq_job_id(spec.job_id, 1)
    assert (
        Job.fetch(rq_id, connection=sync, serializer=SERIALIZER).get_status() == JobStatus.SCHEDULED
    )
    due = await redis.zscore(keys.RETRY_SCHEDULED, spec.job_id)
    assert due is not None

    # Late but still on its way in RQ: left alone.
    assert await retries.sweep_lost(now=due + LOST_AFTER + 1) == 0
    assert await redis.llen(keys.RETRY_INBOX) == 0
    # Its RQ job deleted (by hand from rq-dashboard, say): the retry is scheduled again.
    Job.fetch(rq_id, connection=sync, serializer=SERIALIZER).delete()
    assert await retries.sweep_lost(now=due + 10 * LOST_AFTER) == 1
    assert await redis.lrange(keys.RETRY_INBOX, 0, -1) == [spec.job_id.encode()]
    assert await retries.drain() == 1
    assert (
        Job.fetch(rq_id, connection=sync, serializer=SERIALIZER).get_status() == JobStatus.SCHEDULED
    )
    # Once the job has moved on, the sweep forgets it.
    await redis.hset(keys.job(spec.job_id), "state", "queued")
    assert await retries.sweep_lost(now=due + 100 * LOST_AFTER) == 0
    assert await redis.zcard(keys.RETRY_SCHEDULED) == 0
    sync.close()
