"""The job store against a real Redis: batch claims and batched script calls."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from corral import keys
from corral.batching import ScriptBatcher
from corral.jobs import JobSpec, JobStore
from corral.keys import JobKind
from corral.scripts import Function

MODEL = "llama3:latest"


def _spec(priority: int, prompt: str = "hi") -> JobSpec:
    return JobSpec(
        kind=JobKind.GENERATE,
        model=MODEL,
        request=b'{"model":"llama3:latest","prompt":"%s"}' % prompt.encode(),
        priority=priority,
        gateway_id="gw-test",
        stream=False,
        wait=False,
    )


async def _enqueue(store: JobStore, *specs: JobSpec) -> list[str]:
    for spec in specs:
        await store.enqueue(spec, max_queue=100)
    return [spec.job_id for spec in specs]


async def test_claim_many_takes_the_most_urgent_jobs_up_to_the_limit(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    low = await _enqueue(store, _spec(7), _spec(7), _spec(7))
    cancelled, *urgent = await _enqueue(store, _spec(1), _spec(1), _spec(1))
    await store.cancel(cancelled)

    first = await store.claim_many(MODEL, "node-a", 4)

    assert [job.job_id for job in first] == [*urgent, *low[:2]]
    assert [job.priority for job in first] == [1, 1, 7, 7]
    assert all(job.attempt == 1 for job in first)
    for job in first:
        assert await redis.hget(keys.job(job.job_id), "state") == b"running"
        assert await redis.hget(keys.job(job.job_id), "node") == b"node-a"
    assert await redis.exists(keys.doorbell(MODEL)), "a job still waits: keep ringing"
    # The cancelled job's entry was settled, not left pending.
    pending = await redis.xpending(keys.stream(MODEL, 1), keys.GROUP)
    assert pending["pending"] == 2

    rest = await store.claim_many(MODEL, "node-b", 10)
    assert [job.job_id for job in rest] == low[2:]
    assert not await redis.exists(keys.doorbell(MODEL)), "queue drained: doorbell cleared"
    assert await redis.get(keys.queued_count(MODEL)) == b"0"
    assert await store.claim_many(MODEL, "node-b", 10) == []


async def test_calls_made_in_one_loop_turn_go_out_as_one_pipeline(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    pipelines = _count_pipelines(redis)

    specs = [_spec(5, f"p{i}") for i in range(40)]
    depths = await asyncio.gather(*(store.enqueue(s, max_queue=100) for s in specs))

    assert pipelines == [40], "forty enqueues in one turn: one pipeline of forty"
    assert sorted(depths) == list(range(1, 41))
    assert await redis.xlen(keys.stream(MODEL, 5)) == 40
    claimed = await store.claim_many(MODEL, "node-a", 40)
    assert [job.job_id for job in claimed] == [s.job_id for s in specs]


async def test_a_batch_reloads_scripts_that_redis_lost(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    await _enqueue(store, _spec(5))  # scripts now cached in Redis
    await redis.script_flush()  # as after a Redis restart

    specs = [_spec(5, f"p{i}") for i in range(5)]
    await asyncio.gather(*(store.enqueue(s, max_queue=100) for s in specs))

    assert await redis.xlen(keys.stream(MODEL, 5)) == 6


async def test_a_failed_batch_fails_every_caller_and_a_cancelled_caller_spares_the_rest(
    redis: Redis,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = Redis(port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        script = Function(dead, "touch")
        failing = ScriptBatcher(dead)
        results = await asyncio.gather(
            *(failing.call(script, [], []) for _ in range(3)), return_exceptions=True
        )
        assert len(results) == 3
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    finally:
        await dead.aclose()

    batcher = ScriptBatcher(redis)
    await redis.function_load(
        "#!lua name=test_echo\n"
        "redis.register_function('test_echo', function(keys, args) return args[1] end)",
        replace=True,
    )
    echo = Function(redis, "touch")
    echo.name = "test_echo"
    calls = [asyncio.create_task(batcher.call(echo, [], [str(i)])) for i in range(3)]
    await asyncio.sleep(0)  # all three are queued for the same pipeline
    calls[1].cancel()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert done[0] == b"0" and done[2] == b"2"
    assert isinstance(done[1], asyncio.CancelledError)


def _count_pipelines(redis: Redis) -> list[int]:
    """Record the size of every pipeline ``redis`` executes."""
    sizes: list[int] = []
    make = redis.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make(*args, **kwargs)
        execute = pipe.execute

        async def counted(*a: Any, **kw: Any) -> Any:
            sizes.append(len(pipe.command_stack))
            return await execute(*a, **kw)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    redis.pipeline = pipeline  # type: ignore[method-assign]
    return sizes


@pytest.mark.parametrize("limit", [1, 3])
async def test_claim_never_takes_more_than_asked(redis: Redis, limit: int) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    await _enqueue(store, *(_spec(5) for _ in range(5)))
    assert len(await store.claim_many(MODEL, "node-a", limit)) == limit
    assert await redis.get(keys.queued_count(MODEL)) == str(5 - limit).encode()
