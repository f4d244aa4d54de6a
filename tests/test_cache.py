"""The shared response cache and single-flight, on a live fleet over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest
from redis.asyncio import Redis

from corral import keys
from corral.gateway.cache_key import cache_key
from corral.gateway.cache_store import Answer, CacheStore, decode, encode
from corral.keys import JobKind
from corral.settings import GatewaySettings
from corral.tooling.cluster import LocalCluster, LocalGateway
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import until
from tests.tcp_proxy import TcpProxy

DETERMINISTIC = {"temperature": 0}
SLOW = 1.0
"""Tokens/s of a job a test needs still running while it sets up (sped up after)."""


def _generate(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "llama3", "prompt": prompt, "options": DETERMINISTIC, **extra}


def _calls(fleet: LocalCluster, path: str = "/api/generate") -> int:
    return sum(int(n.fake.fake.stats()["requests"].get(path, 0)) for n in fleet.nodes)


@pytest.fixture
async def fleet(start_cluster: Any) -> LocalCluster:
    started: LocalCluster = await start_cluster([FakeOllamaConfig(num_parallel=4)])
    return started


async def _client(fleet: LocalCluster) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=fleet.url, timeout=30)


@pytest.fixture
async def http(fleet: LocalCluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fleet.url, timeout=30) as client:
        yield client


@pytest.fixture
async def second(fleet: LocalCluster) -> AsyncIterator[LocalGateway]:
    gateway = LocalGateway(GatewaySettings(redis_url=fleet.redis_url, port=0))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def test_miss_then_hit_with_the_same_answer(fleet: LocalCluster, http: Any) -> None:
    body = _generate("cache me", stream=False)
    first = await http.post("/api/generate", json=body)
    second = await http.post("/api/generate", json=body)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-corral-cache"] == "miss"
    assert second.headers["x-corral-cache"] == "hit"
    assert second.content == first.content
    assert orjson.loads(second.content)["response"] == "echo: cache me"
    assert _calls(fleet) == 1
    # Another priority and another key still share the entry: neither is in the key.
    third = await http.post(
        "/api/generate", json=body, headers={"x-corral-priority": "1", "authorization": "x"}
    )
    assert third.headers["x-corral-cache"] == "hit"
    assert _calls(fleet) == 1


async def test_l2_hit_on_another_gateway(fleet: LocalCluster, http: Any, second: Any) -> None:
    body = _generate("shared", stream=False)
    first = await http.post("/api/generate", json=body)
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as other:
        reply = await other.post("/api/generate", json=body)
    assert reply.headers["x-corral-cache"] == "hit"
    assert reply.content == first.content
    assert _calls(fleet) == 1


async def test_bypass_for_nondeterministic_requests_and_by_header(
    fleet: LocalCluster, http: Any
) -> None:
    plain = {"model": "llama3", "prompt": "random", "stream": False}
    for _ in range(2):
        reply = await http.post("/api/generate", json=plain)
        assert reply.headers["x-corral-cache"] == "bypass"
    assert _calls(fleet) == 2
    body = _generate("fresh please", stream=False)
    for _ in range(2):
        reply = await http.post("/api/generate", json=body, headers={"x-corral-cache": "bypass"})
        assert reply.headers["x-corral-cache"] == "bypass"
    assert _calls(fleet) == 4
    # A fixed seed is deterministic too; a negative one asks for a random seed.
    seeded = {**plain, "options": {"seed": 7}}
    assert (await http.post("/api/generate", json=seeded)).headers["x-corral-cache"] == "miss"
    assert (await http.post("/api/generate", json=seeded)).headers["x-corral-cache"] == "hit"
    random_seed = {**plain, "options": {"seed": -1}}
    reply = await http.post("/api/generate", json=random_seed)
    assert reply.headers["x-corral-cache"] == "bypass"


async def test_widened_cache_takes_nondeterministic_requests(start_cluster: Any) -> None:
    fleet = await start_cluster([FakeOllamaConfig()], gateway={"cache_widen": True})
    async with httpx.AsyncClient(base_url=fleet.url, timeout=30) as http:
        plain = {"model": "llama3", "prompt": "any", "stream": False}
        assert (await http.post("/api/generate", json=plain)).headers["x-corral-cache"] == "miss"
        assert (await http.post("/api/generate", json=plain)).headers["x-corral-cache"] == "hit"
    assert _calls(fleet) == 1


async def test_level_two_serves_nondeterministic_requests_from_the_cache(
    start_cluster: Any,
) -> None:
    fleet: LocalCluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=4)], gateway={"cache_widen_level": 2}
    )
    http = await _client(fleet)
    assert fleet.gateway is not None
    fleet.gateway.state.fleet.level = 1
    plain = {"model": "llama3", "prompt": "busy day", "stream": False}
    assert (await http.post("/api/generate", json=plain)).headers["x-corral-cache"] == "bypass"
    fleet.gateway.state.fleet.level = 2
    plain = {"model": "llama3", "prompt": "busy day", "stream": False}
    assert (await http.post("/api/generate", json=plain)).headers["x-corral-cache"] == "miss"
    assert (await http.post("/api/generate", json=plain)).headers["x-corral-cache"] == "hit"
    ttl = await fleet.gateway.state.redis.pttl(keys.cache_entry(_key(plain, stream=False)))
    assert ttl > fleet.gateway.settings.cache_ttl * 1000  # the longer TTL of levels >= 1
    await http.aclose()


async def test_levels_leave_nondeterministic_requests_alone_by_default(
    fleet: LocalCluster, http: Any
) -> None:
    """Under an overload every request would pay a lookup and a lock in Redis."""
    assert fleet.gateway is not None
    fleet.gateway.state.fleet.level = 3
    plain = {"model": "llama3", "prompt": "busy night", "stream": False}
    for _ in range(2):
        reply = await http.post("/api/generate", json=plain)
        assert reply.headers["x-corral-cache"] == "bypass"


def _key(body: dict[str, Any], *, stream: bool, kind: JobKind = JobKind.GENERATE) -> str:
    resolved = {**body, "model": "llama3:latest"}
    if kind.streams:
        resolved["stream"] = True
    return cache_key(kind, stream, resolved)


async def test_streamed_hit_ollama_dialect(fleet: LocalCluster, http: Any) -> None:
    body = _generate("one two three four")

    async def lines() -> tuple[str, list[bytes]]:
        async with http.stream("POST", "/api/generate", json=body) as reply:
            assert reply.headers["content-type"].startswith("application/x-ndjson")
            return reply.headers["x-corral-cache"], [
                line.encode() async for line in reply.aiter_lines() if line
            ]

    miss_outcome, miss = await lines()
    hit_outcome, hit = await lines()
    assert (miss_outcome, hit_outcome) == ("miss", "hit")
    assert len(miss) > 2 and hit == miss  # the same chunks, the same final object
    assert orjson.loads(hit[-1])["done"] is True
    # The official client sees the same answer.
    async with ollama.AsyncClient(host=fleet.url) as client:
        parts = [p async for p in await client.generate(**body, stream=True)]
    assert "".join(p.response for p in parts) == "echo: one two three four"
    assert parts[-1].eval_count == orjson.loads(miss[-1])["eval_count"]
    assert _calls(fleet) == 1


async def test_streamed_hit_openai_dialect(fleet: LocalCluster) -> None:
    client = openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="none")
    ask = {
        "model": "llama3",
        "messages": [{"role": "user", "content": "tell me again"}],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def run() -> tuple[str, list[Any]]:
        raw = await client.chat.completions.with_raw_response.create(**ask)
        stream = raw.parse()
        return raw.headers["x-corral-cache"], [chunk async for chunk in stream]

    (miss_outcome, miss), (hit_outcome, hit) = await run(), await run()
    assert (miss_outcome, hit_outcome) == ("miss", "hit")

    def fields(chunks: list[Any]) -> list[Any]:
        return [c.model_dump(exclude={"id", "created"}) for c in chunks]

    assert len(miss) > 2 and fields(hit) == fields(miss)
    text = "".join(c.choices[0].delta.content or "" for c in hit if c.choices)
    assert text == "echo: tell me again"
    assert hit[-1].usage is not None and hit[-1].usage == miss[-1].usage
    # Non-streamed, the dialect answers one object, from its own entry.
    single = {**ask, "stream": False}
    single.pop("stream_options")
    one = await client.chat.completions.create(**single)
    again = await client.chat.completions.with_raw_response.create(**single)
    assert again.headers["x-corral-cache"] == "hit"
    assert again.parse().choices[0].message.content == one.choices[0].message.content
    assert _calls(fleet, "/api/chat") == 2  # one streamed answer, one single one
    await client.close()


async def test_errors_are_not_cached(fleet: LocalCluster, http: Any) -> None:
    fake = fleet.nodes[0].fake.fake
    fake.configure(fail_next=1, fail_status=400)
    body = _generate("fails first", stream=False)
    first = await http.post("/api/generate", json=body)
    assert first.status_code == 400
    second = await http.post("/api/generate", json=body)
    assert second.status_code == 200
    assert second.headers["x-corral-cache"] == "miss"
    assert _calls(fleet) == 2


@pytest.mark.parametrize("stream", [True, False])
async def test_single_flight_100_requests_across_two_gateways(
    fleet: LocalCluster, second: LocalGateway, stream: bool
) -> None:
    fleet.nodes[0].fake.fake.configure(token_rate=20)  # long enough for all to arrive
    body = _generate("everyone asks this at once", stream=stream)
    limits = httpx.Limits(max_connections=100)
    async with (
        httpx.AsyncClient(base_url=fleet.url, timeout=60, limits=limits) as one,
        httpx.AsyncClient(base_url=second.url, timeout=60, limits=limits) as two,
    ):

        async def ask(client: httpx.AsyncClient) -> tuple[str, bytes]:
            reply = await client.post("/api/generate", json=body)
            assert reply.status_code == 200
            return reply.headers["x-corral-cache"], reply.content

        results = await asyncio.gather(*(ask(one if i % 2 else two) for i in range(100)))
    outcomes = [outcome for outcome, _ in results]
    assert _calls(fleet) == 1
    assert outcomes.count("miss") == 1 and outcomes.count("hit") == 99
    assert len({content for _, content in results}) == 1
    lines = results[0][1].splitlines()
    text = "".join(orjson.loads(x)["response"] for x in lines)
    assert text == "echo: everyone asks this at once"


async def test_leader_disconnect_leaves_followers_answered(
    fleet: LocalCluster, http: Any, second: LocalGateway
) -> None:
    fake = fleet.nodes[0].fake.fake
    fake.configure(token_rate=SLOW)
    body = _generate("the leader leaves early")
    leader = httpx.AsyncClient(base_url=fleet.url, timeout=30)
    async with leader.stream("POST", "/api/generate", json=body) as reply:
        assert reply.headers["x-corral-cache"] == "miss"
        lines = reply.aiter_lines()
        await anext(lines)  # the job runs and has streamed
        local = asyncio.create_task(http.post("/api/generate", json=body))
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as other:
            remote = asyncio.create_task(other.post("/api/generate", json=body))
            redis = fleet.gateway.state.redis  # type: ignore[union-attr]

            async def followed() -> bool:
                return bool(await redis.exists(keys.cache_followed(_key(body, stream=True))))

            await until(followed, True)
            await until(lambda: _flight_subscribers(fleet, body), 2)
            await leader.aclose()  # the leader's client goes away mid-answer
            fake.configure(token_rate=0)
            answers = [await local, await remote]
    for answer in answers:
        assert answer.status_code == 200 and answer.headers["x-corral-cache"] == "hit"
        text = "".join(orjson.loads(x)["response"] for x in answer.content.splitlines())
        assert text == "echo: the leader leaves early"
    assert _calls(fleet) == 1 and fake.stats()["disconnects"] == 0


async def _flight_subscribers(fleet: LocalCluster, body: dict[str, Any]) -> int:
    flights = fleet.gateway.state.cache.flights  # type: ignore[union-attr]
    flight = flights.get(_key(body, stream=True))
    return len(flight.subscribers) if flight is not None else 0


async def test_leader_alone_disconnecting_cancels_its_job(fleet: LocalCluster) -> None:
    fake = fleet.nodes[0].fake.fake
    fake.configure(token_rate=SLOW)
    body = _generate("nobody else wants this")
    client = httpx.AsyncClient(base_url=fleet.url, timeout=30)
    async with client.stream("POST", "/api/generate", json=body) as reply:
        await anext(reply.aiter_lines())
        await client.aclose()
    await fake.wait_until(lambda s: s["active"] == 0 and s["disconnects"] == 1, within=10.0)
    redis = fleet.gateway.state.redis  # type: ignore[union-attr]
    assert await redis.exists(keys.cache_entry(_key(body, stream=True))) == 0

    async def lock() -> int:
        return int(await redis.exists(keys.cache_flight(_key(body, stream=True))))

    await until(lock, 0)


async def test_lapsed_lock_of_a_dead_gateway_is_not_waited_for(
    fleet: LocalCluster, http: Any
) -> None:
    body = _generate("orphaned lock", stream=False)
    redis = fleet.gateway.state.redis  # type: ignore[union-attr]
    key = _key(body, stream=False)
    # A gateway took the lock for a job and died before enqueueing it.
    await redis.set(keys.cache_flight(key), "gone-gateway deadbeef", px=800)
    started = time.monotonic()
    reply = await http.post("/api/generate", json=body)
    assert reply.status_code == 200
    assert orjson.loads(reply.content)["response"] == "echo: orphaned lock"
    assert time.monotonic() - started < 20  # not the request timeout: the lock lapsed
    assert _calls(fleet) == 1


async def test_corrupt_l2_entry_is_a_miss(start_cluster: Any) -> None:
    fleet = await start_cluster([FakeOllamaConfig()], gateway={"cache_l1_bytes": 0})
    body = _generate("corrupt me", stream=False)
    redis = fleet.gateway.state.redis
    async with httpx.AsyncClient(base_url=fleet.url, timeout=30) as http:
        first = await http.post("/api/generate", json=body)
        entry = keys.cache_entry(_key(body, stream=False))
        stored = await redis.get(entry)
        assert decode(stored).final == first.content
        await redis.set(entry, stored[:-5] + b"xxxxx")
        second = await http.post("/api/generate", json=body)
        assert second.headers["x-corral-cache"] == "miss"
        assert orjson.loads(second.content)["response"] == "echo: corrupt me"
        third = await http.post("/api/generate", json=body)  # rewritten by the second
        assert third.headers["x-corral-cache"] == "hit"
    assert _calls(fleet) == 2


async def test_metrics(fleet: LocalCluster, http: Any) -> None:
    body = _generate("count me", stream=False)
    await http.post("/api/generate", json=body)
    await http.post("/api/generate", json=body)
    await http.post("/api/generate", json={"model": "llama3", "prompt": "x", "stream": False})
    text = (await http.get("/metrics")).text
    for outcome in ("hit", "miss", "bypass"):
        line = next(
            x
            for x in text.splitlines()
            if x.startswith("corral_cache_requests_total{") and f'outcome="{outcome}"' in x
        )
        assert line.endswith(" 1.0")
    assert 'corral_cache_evictions_total{tier="l1"} 0.0' in text
    l2 = next(x for x in text.splitlines() if x.startswith('corral_cache_bytes{tier="l2"}'))
    assert float(l2.split()[-1]) > 0


# --- the tiers on their own, against the real Redis ---


def _answer(size: int, tag: str) -> Answer:
    return Answer((tag.encode() * size,), b'{"done":true}')


async def test_l1_evicts_least_recently_used_under_its_byte_cap(redis: Redis) -> None:
    settings = GatewaySettings(redis_url="redis://unused", cache_l1_bytes=4000)
    store = CacheStore(redis, settings)
    for i in range(10):
        store.remember(f"k{i}", _answer(900, str(i)))
        assert store.l1_bytes <= 4000
    fits = 4000 // _answer(900, "x").size
    assert store.l1_evictions == 10 - fits
    assert store.local("k9") is not None and store.local("k0") is None


async def test_l2_evicts_under_its_byte_cap_and_counts_bytes(redis: Redis) -> None:
    settings = GatewaySettings(redis_url="redis://unused", cache_l2_bytes=10_000)
    store = CacheStore(redis, settings)
    for i in range(20):
        await store.store(f"k{i}", _answer(1500, str(i % 10)), level=0)
    used, evictions = await store.l2_figures()
    assert used <= 10_000 and evictions > 0
    live = [k for k in await redis.keys(keys.cache_entry("*"))]
    sizes = [await redis.strlen(k) for k in live]
    assert sum(sizes) == used  # every entry counted, nothing else
    assert await redis.exists(keys.cache_entry("k19")) == 1


async def test_oom_on_cache_write_is_not_an_error(redis: Redis) -> None:
    store = CacheStore(redis, GatewaySettings(redis_url="redis://unused"))
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)
    try:
        await store.store("k", _answer(10, "a"), level=0)  # must not raise
    finally:
        await redis.config_set("maxmemory", 0)
    assert store.write_failures == 1
    assert await redis.exists(keys.cache_entry("k")) == 0


async def test_stalled_lookup_is_a_miss_within_its_bound(redis_url: str) -> None:
    proxy = await TcpProxy(redis_url).start()
    client = Redis.from_url(proxy.url)
    try:
        settings = GatewaySettings(redis_url=proxy.url, cache_lookup_timeout=0.2)
        store = CacheStore(client, settings)
        await store.store("k", _answer(10, "a"), level=0)
        assert await store.fetch("k") is not None
        store.l1.clear()  # type: ignore[union-attr]
        proxy.freeze()
        # Bounded by the lookup timeout; without it, this would wait for ever.
        assert await asyncio.wait_for(store.fetch("k"), 10) is None
    finally:
        await client.aclose()
        await proxy.aclose()


def test_codec_round_trip_and_garbage() -> None:
    answer = Answer((b'{"a":1}', b""), b'{"done":true}')
    assert decode(encode(answer)) == answer
    for bad in (b"", b"garbage", encode(answer)[:-1], encode(answer) + b"x"):
        with pytest.raises(ValueError):
            decode(bad)


@pytest.fixture
async def unresumed(start_cluster: Any) -> LocalCluster:
    """A fleet whose streams end with an error when their node dies (no resumption)."""
    started: LocalCluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=4)], worker={"resume_streams": False}
    )
    return started


async def test_a_failed_job_gives_its_followers_the_same_error_and_is_not_cached(
    unresumed: LocalCluster,
) -> None:
    fleet = unresumed
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=fleet.url, timeout=30))
        second = LocalGateway(GatewaySettings(redis_url=fleet.redis_url, port=0))
        await second.start()
        stack.push_async_callback(second.stop)
        await _failed_job_shared(fleet, http, second)


async def _failed_job_shared(fleet: LocalCluster, http: Any, second: LocalGateway) -> None:
    fake = fleet.nodes[0].fake.fake
    fake.configure(token_rate=SLOW)
    body = _generate("a long answer that will break halfway through it")
    leader = asyncio.create_task(http.post("/api/generate", json=body))
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as other:
        remote = asyncio.create_task(other.post("/api/generate", json=body))
        redis = fleet.gateway.state.redis  # type: ignore[union-attr]

        async def followed() -> bool:
            return bool(await redis.exists(keys.cache_followed(_key(body, stream=True))))

        await until(followed, True)
        local = asyncio.create_task(http.post("/api/generate", json=body))
        await until(lambda: _flight_subscribers(fleet, body), 2)
        fake.configure(crash_after_tokens=1)  # the node dies mid-answer
        answers = [await leader, await local, await remote]
    ends = [orjson.loads(a.content.splitlines()[-1]) for a in answers]
    assert all("error" in end for end in ends), ends
    assert len({end["error"] for end in ends}) == 1
    assert _calls(fleet) == 1
    fake.configure(crash_after_tokens=None, token_rate=0)
    again = await http.post("/api/generate", json=body)
    assert again.headers["x-corral-cache"] == "miss"
    assert _calls(fleet) == 2


async def test_followers_run_the_job_again_when_it_is_cancelled_from_under_them(
    fleet: LocalCluster, http: Any, second: LocalGateway
) -> None:
    fake = fleet.nodes[0].fake.fake
    fake.configure(token_rate=SLOW)
    body = _generate("cancel the leader of this one")
    async with http.stream("POST", "/api/generate", json=body) as reply:
        job_id = reply.headers["x-corral-job-id"]
        lines = reply.aiter_lines()
        await anext(lines)
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as other:
            remote = asyncio.create_task(other.post("/api/generate", json=body))
            redis = fleet.gateway.state.redis  # type: ignore[union-attr]

            async def followed() -> bool:
                return bool(await redis.exists(keys.cache_followed(_key(body, stream=True))))

            await until(followed, True)
            assert (await http.delete(f"/jobs/{job_id}")).status_code == 200
            fake.configure(token_rate=0)
            rest = [line async for line in lines]
            answer = await remote
    assert "error" in orjson.loads(rest[-1])  # the leader's own request was cancelled
    assert answer.status_code == 200
    text = "".join(orjson.loads(x)["response"] for x in answer.content.splitlines())
    assert text == "echo: cancel the leader of this one"
    assert _calls(fleet) == 2  # the follower ran it again


async def test_leader_disconnect_keeps_the_job_for_a_follower_on_another_gateway(
    fleet: LocalCluster, second: LocalGateway
) -> None:
    fake = fleet.nodes[0].fake.fake
    fake.configure(token_rate=SLOW)
    body = _generate("only another gateway still wants this")
    leader = httpx.AsyncClient(base_url=fleet.url, timeout=30)
    async with leader.stream("POST", "/api/generate", json=body) as reply:
        lines = reply.aiter_lines()  # kept: a collected iterator closes the response
        await anext(lines)
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as other:
            remote = asyncio.create_task(other.post("/api/generate", json=body))
            redis = fleet.gateway.state.redis  # type: ignore[union-attr]

            async def followed() -> bool:
                return bool(await redis.exists(keys.cache_followed(_key(body, stream=True))))

            await until(followed, True)
            await leader.aclose()  # no request on the leader's gateway wants it any more
            fake.configure(token_rate=0)
            answer = await remote
    text = "".join(orjson.loads(x)["response"] for x in answer.content.splitlines())
    assert text == "echo: only another gateway still wants this"
    assert _calls(fleet) == 1 and fake.stats()["disconnects"] == 0
    # The job ran to its end for the follower, and its answer was cached.
    async with httpx.AsyncClient(base_url=fleet.url, timeout=30) as client:
        hit = await client.post("/api/generate", json=body)
    assert hit.headers["x-corral-cache"] == "hit"


async def test_followers_get_the_answer_when_the_leading_gateway_dies(
    fleet: LocalCluster, http: Any
) -> None:
    """A gateway cut off from Redis stops renewing its lock; the job it enqueued runs on,
    and the requests following it on another gateway get its answer all the same."""
    fake = fleet.nodes[0].fake.fake
    fake.configure(token_rate=SLOW)
    proxy = await TcpProxy(fleet.redis_url).start()
    doomed = LocalGateway(GatewaySettings(redis_url=proxy.url, port=0, cache_flight_ttl=1.0))
    await doomed.start()
    body = _generate("the leading gateway dies while its job runs on")
    redis = fleet.gateway.state.redis  # type: ignore[union-attr]
    key = _key(body, stream=True)
    client = httpx.AsyncClient(base_url=doomed.url, timeout=60)
    leader = asyncio.create_task(client.post("/api/generate", json=body))
    try:

        async def exists(name: str) -> bool:
            return bool(await redis.exists(name))

        await until(lambda: exists(keys.cache_flight(key)), True)
        follower = asyncio.create_task(http.post("/api/generate", json=body))
        await until(lambda: exists(keys.cache_followed(key)), True)
        proxy.hold_new()
        proxy.freeze()  # the leading gateway can no longer reach Redis: as good as dead
        await until(lambda: exists(keys.cache_flight(key)), False)  # its lock lapsed
        fake.configure(token_rate=0)
        answer = await asyncio.wait_for(follower, 30)
        assert answer.status_code == 200
        text = "".join(orjson.loads(x)["response"] for x in answer.content.splitlines())
        assert text == "echo: the leading gateway dies while its job runs on"
        assert _calls(fleet) == 1
    finally:
        proxy.release()
        for link in proxy.links:  # back from the dead, so that it can stop
            link.flowing.set()
        leader.cancel()
        await client.aclose()
        await doomed.stop()
        await proxy.aclose()
