"""Memory is bounded: per tenant (a byte quota on what its jobs hold in Redis) and
overall (new work refused near ``maxmemory``); requests are dropped once they cannot be
retried, every record expires, cancelled queued jobs leave the queue count at once and
replay lists stop at a cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from corral import keys
from corral.errors import QueueFull, QuotaExceeded
from corral.jobs import JobSpec, JobStore
from corral.keys import JobKind, JobState
from corral.settings import GatewaySettings
from corral.tooling.cluster import LocalCluster, LocalGateway
from corral.tooling.fake_ollama import FakeOllamaConfig
from corral.tooling.redis_proc import RedisProcess
from tests.helpers import held_bytes, until

MODEL = "llama3:latest"
KEY_A, KEY_B = "tenant-a-key-0001", "tenant-b-key-0002"


def _spec(tenant: str = "t1", quota: int = 0, size: int = 1000, wait: bool = False) -> JobSpec:
    return JobSpec(
        kind=JobKind.GENERATE,
        model=MODEL,
        request=b'{"model":"llama3:latest","prompt":"%s"}' % (b"x" * size),
        priority=5,
        gateway_id="gw-test",
        stream=False,
        wait=wait,
        tenant=tenant,
        quota=quota,
    )


# -- the job store: what a record holds, and for how long --------------------------------


async def test_a_tenant_is_charged_its_request_then_its_result_and_refused_past_its_quota(
    redis: Redis,
) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=5)
    first = _spec(quota=2500)
    await store.enqueue(first, max_queue=100)
    assert await held_bytes(redis, "t1") == len(first.request)
    await store.enqueue(_spec(quota=2500), max_queue=100)
    with pytest.raises(QuotaExceeded, match="storage quota exceeded"):
        await store.enqueue(_spec(quota=2500), max_queue=100)
    assert await held_bytes(redis, "other") == 0
    await store.enqueue(_spec(tenant="other", quota=2500), max_queue=100)  # not t1's quota

    job = await store.claim(MODEL, "node-a")
    assert job is not None and job.job_id == first.job_id
    result = b'{"response":"ok"}'
    assert await store.finish(job, "node-a", JobState.DONE, result=result)
    record = keys.job(first.job_id)
    # Finished, it cannot be retried: the request is gone, the result charged until the
    # record expires (wait=false: job_ttl).
    assert await redis.hexists(record, "req") is False
    assert 0 < await redis.ttl(record) <= 60
    assert await held_bytes(redis, "t1") == len(result) + len(_spec().request)
    await store.enqueue(_spec(quota=2500), max_queue=100)  # room again


async def test_expired_records_release_their_charge_at_the_next_enqueue(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=1, result_ttl=1)
    spec = _spec()
    await store.enqueue(spec, max_queue=100)
    job = await store.claim(MODEL, "node-a")
    assert job is not None
    assert await store.finish(job, "node-a", JobState.DONE, result=b"r" * 300)
    assert await held_bytes(redis, "t1") == 300

    async def gone() -> bool:
        return not await redis.exists(keys.job(spec.job_id))

    await until(gone, True, within=5)  # its own TTL: no script runs when it expires
    later = _spec(size=10)
    await store.enqueue(later, max_queue=100)
    assert await held_bytes(redis, "t1") == len(later.request)


async def test_a_cancelled_job_drops_its_request_releases_its_charge_and_expires(
    redis: Redis,
) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = _spec()
    await store.enqueue(spec, max_queue=100)
    assert await store.cancel(spec.job_id) == JobState.QUEUED
    record = keys.job(spec.job_id)
    assert await redis.hexists(record, "req") is False
    assert 0 < await redis.ttl(record) <= 60
    assert await held_bytes(redis, "t1") == 0


async def test_cancelled_and_expired_queued_jobs_leave_the_queue_count_at_once(
    redis: Redis,
) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    first = [_spec(tenant="") for _ in range(5)]
    for spec in first:
        await store.enqueue(spec, max_queue=5)
    with pytest.raises(QueueFull):
        await store.enqueue(_spec(tenant=""), max_queue=5)
    for n, spec in enumerate(first):  # timed out waiting (expired) or cancelled by a client
        await store.cancel(spec.job_id, "timed out", expired=n % 2 == 0)
    assert await redis.get(keys.queued_count(MODEL)) == b"0"
    second = [_spec(tenant="") for _ in range(5)]
    for spec in second:  # no claim ran, yet the queue has room again
        await store.enqueue(spec, max_queue=5)
    # A claim settles the cancelled entries without counting them a second time.
    claimed = await store.claim_many(MODEL, "node-a", 10)
    assert [job.job_id for job in claimed] == [spec.job_id for spec in second]
    assert await redis.get(keys.queued_count(MODEL)) == b"0"


# -- the gateway: a flood from one key, and Redis near maxmemory ---------------------------


@pytest.fixture
async def small_redis() -> AsyncIterator[RedisProcess]:
    """A Redis of 64 MiB that refuses writes beyond it, as a production one should."""
    server = RedisProcess(extra_args=["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _streamed_text(reply: httpx.Response) -> str:
    return "".join(orjson.loads(line).get("response", "") for line in reply.text.splitlines())


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_a_flood_of_large_jobs_from_one_key_is_refused_before_redis_fills(
    small_redis: RedisProcess,
) -> None:
    quota = 8 * 1024 * 1024
    cluster = await LocalCluster.start(
        small_redis.url,
        # llama3's node never answers, so every wait=false job stays queued with its body.
        [FakeOllamaConfig(models=[MODEL], hang=True), FakeOllamaConfig(models=["qwen2:0.5b"])],
        gateway={"api_keys": f"{KEY_A},{KEY_B}", "tenant_quota_bytes": quota},
    )
    redis = Redis.from_url(small_redis.url)
    big = {"model": MODEL, "prompt": "x" * (1024 * 1024)}
    try:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
            statuses = []
            for _ in range(40):  # 40 MiB of bodies: would fill most of this Redis
                reply = await http.post(
                    "/jobs",
                    json={"kind": "generate", "request": big, "wait": False},
                    headers=_auth(KEY_A),
                )
                statuses.append(reply.status_code)
                if reply.status_code == 429:
                    assert "storage quota exceeded" in reply.json()["error"]
            accepted = statuses.count(202)
            assert 6 <= accepted <= 8 and statuses.count(429) == 40 - accepted, statuses
            memory = await redis.info("memory")
            assert memory["used_memory"] < 0.5 * memory["maxmemory"]

            # Another key is still served, both queued and answered.
            other = await http.post(
                "/jobs",
                json={"kind": "generate", "request": big, "wait": False},
                headers=_auth(KEY_B),
            )
            assert other.status_code == 202, other.text
            answered = await http.post(
                "/api/generate",
                json={"model": "qwen2:0.5b", "prompt": "hello", "stream": False},
                headers=_auth(KEY_B),
            )
            assert answered.status_code == 200 and answered.json()["response"] == "echo: hello"
    finally:
        await cluster.stop()
        await redis.aclose()


async def test_new_work_is_refused_with_a_503_when_redis_nears_maxmemory(
    small_redis: RedisProcess,
) -> None:
    cluster = await LocalCluster.start(
        small_redis.url,
        [FakeOllamaConfig(models=[MODEL])],
        gateway={"redis_memory_limit": 0.5, "fleet_refresh": 0.05},
    )
    redis = Redis.from_url(small_redis.url)
    body = {"model": MODEL, "prompt": "hello", "stream": False}
    try:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
            assert (await http.post("/api/generate", json=body)).status_code == 200
            # Someone else's data fills this Redis past the limit (over half of maxmemory).
            for n in range(4):
                await redis.set(f"ballast:{n}", b"b" * (9 * 1024 * 1024))

            async def status() -> int:
                return (await http.post("/api/generate", json=body)).status_code

            await until(status, 503)
            reply = await http.post("/api/generate", json=body)
            assert "storage nearly full" in reply.json()["error"]
            openai = await http.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert openai.status_code == 503
            assert "storage nearly full" in openai.json()["error"]["message"]

            await redis.delete(*(f"ballast:{n}" for n in range(4)))
            await until(status, 200)
    finally:
        await cluster.stop()
        await redis.aclose()


# -- replay lists ----------------------------------------------------------------------


async def test_a_long_stream_keeps_only_the_first_chunks_for_replay_and_is_answered_whole(
    start_cluster: object, redis: Redis
) -> None:
    cluster: LocalCluster = await start_cluster(  # type: ignore[operator]
        [FakeOllamaConfig(models=[MODEL])], worker={"replay_max_messages": 3}
    )
    prompt = " ".join(f"w{i}" for i in range(20))
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
        http.stream("POST", "/api/generate", json={"model": MODEL, "prompt": prompt}) as reply,
    ):
        lines = [line async for line in reply.aiter_lines() if line]
        job_id = reply.headers["x-corral-job-id"]
    assert len(lines) > 10  # every chunk reached the client live
    assert "".join(orjson.loads(line).get("response", "") for line in lines) == f"echo: {prompt}"
    assert await redis.llen(keys.output(job_id)) == 3  # only the first 3 were kept
    assert await redis.hget(keys.job(job_id), "replay_cut") == b"1"


async def test_a_follower_on_another_gateway_past_a_cut_replay_list_is_told_to_retry(
    start_cluster: object,
) -> None:
    """The response cache's single-flight followers on other gateways read the replay
    list. One that relayed chunks of a list the worker cut cannot finish that stream (the
    record's whole answer would repeat them): its client gets a 503, and asked again is
    answered whole from the cache its leader filled; never a repeated or garbled text."""
    cluster: LocalCluster = await start_cluster(  # type: ignore[operator]
        [FakeOllamaConfig(models=[MODEL], token_rate=20.0)], worker={"replay_max_messages": 2}
    )
    second = LocalGateway(GatewaySettings(redis_url=cluster.redis_url, port=0))
    await second.start()
    prompt = " ".join(f"w{i}" for i in range(12))
    body = {"model": MODEL, "prompt": prompt, "options": {"temperature": 0}}  # streamed
    try:
        async with (
            httpx.AsyncClient(base_url=cluster.url, timeout=30) as one,
            httpx.AsyncClient(base_url=second.url, timeout=30) as two,
        ):
            leader = asyncio.create_task(one.post("/api/generate", json=body))
            redis = cluster.gateway.state.redis  # type: ignore[union-attr]

            async def leading() -> int:
                return len(await redis.keys(keys.cache_flight("*")))

            await until(leading, 1)
            follower = await two.post("/api/generate", json=body)
            led = await leader
            again = await two.post("/api/generate", json=body)
        assert led.status_code == 200 and _streamed_text(led) == f"echo: {prompt}"
        job_id = led.headers["x-corral-job-id"]
        assert await redis.hget(keys.job(job_id), "replay_cut") == b"1"
        # Its stream began (200) with the kept chunks and ended with the error line.
        last = orjson.loads(follower.text.splitlines()[-1])
        assert "too long to relay" in last["error"], follower.text
        assert f"echo: {prompt}" not in _streamed_text(follower)
        assert again.headers["x-corral-cache"] == "hit"
        assert _streamed_text(again) == f"echo: {prompt}"
    finally:
        await second.stop()


async def test_accepted_work_settles_at_maxmemory_and_new_work_is_refused(
    small_redis: RedisProcess,
) -> None:
    """A completed generation whose settlement Redis refused would run again if its
    worker died before Redis had room: the functions that settle accepted work run at
    maxmemory (``allow-oom``), as they did as plain scripts; enqueue does not."""
    redis = Redis.from_url(small_redis.url)
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    try:
        first, second = _spec(tenant=""), _spec(tenant="")
        await store.enqueue(first, max_queue=100)
        await store.enqueue(second, max_queue=100)
        running = await store.claim_many(MODEL, "node-a", 1)
        await redis.config_set("maxmemory", 1)  # Redis is full
        try:
            assert await store.finish(running[0], "node-a", JobState.DONE, result=b"{}")
            assert [job.job_id for job in await store.claim_many(MODEL, "node-a", 1)] == [
                second.job_id
            ]
            with pytest.raises(OutOfMemoryError):
                await store.enqueue(_spec(tenant=""), max_queue=100)
        finally:
            await redis.config_set("maxmemory", 64 * 1024 * 1024)
        assert await redis.hget(keys.job(first.job_id), "state") == b"done"
    finally:
        await redis.aclose()
