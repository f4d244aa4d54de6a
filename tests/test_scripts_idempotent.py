"""Every job script is safe to run twice.

redis-py re-sends a command after a timeout, and a Redis that stalled past the client's
timeout may already have run the first copy. Each test here runs the same call twice,
byte for byte, as that re-send would, and checks that the second changes nothing and
answers what the first did. (Issue: one request became two stream entries, and a re-sent
enqueue reset a running job to ``queued``.)
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis as redis_sync
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from corral import fleet, keys, protocol
from corral.jobs import DOORBELL_CAP, ORPHANED, JobSpec, JobStore
from corral.keys import JobKind
from corral.scheduler import retry_job
from corral.scheduler.lease import Lease
from corral.scripts import Cancel, Requeue, Retry, argv
from corral.tooling.redis_proc import EmbeddedRedis

MODEL = "llama3:latest"


def _spec(**overrides: Any) -> JobSpec:
    options: dict[str, Any] = {
        "kind": JobKind.GENERATE,
        "model": MODEL,
        "request": b'{"model":"llama3:latest","prompt":"hi"}',
        "priority": 5,
        "gateway_id": "gw",
        "stream": False,
        "wait": False,
        **overrides,
    }
    return JobSpec(**options)


async def _published(pubsub: PubSub) -> list[bytes]:
    """Every message that arrives until none has for half a second."""
    published = []
    loop = asyncio.get_running_loop()
    quiet_until = loop.time() + 0.5  # a second message would arrive well within this
    while loop.time() < quiet_until:
        got = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if got is not None:
            published.append(got["data"])
    return published


async def _entries(redis: Redis) -> int:
    return int(await redis.xlen(keys.stream(MODEL, 5)))


async def test_a_resent_enqueue_adds_nothing_and_never_resets_a_running_job(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = _spec()
    assert await store.enqueue(spec, max_queue=10) == 1
    assert await store.enqueue(spec, max_queue=10) == 1  # the re-sent copy
    assert await _entries(redis) == 1
    assert await redis.get(keys.queued_count(MODEL)) == b"1"
    claimed = await store.claim(MODEL, "node-a")
    assert claimed is not None
    assert await store.enqueue(spec, max_queue=10) == 0  # arriving late, after the claim
    assert await redis.hget(keys.job(spec.job_id), "state") == b"running"
    assert await _entries(redis) == 1


async def test_a_resent_claim_answers_the_jobs_the_first_took(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    specs = [_spec() for _ in range(3)]
    for spec in specs:
        await store.enqueue(spec, max_queue=10)
    receipt = keys.claim_receipt(MODEL, uuid.uuid4().hex)
    call_keys = [
        *keys.streams(MODEL),
        keys.queued_count(MODEL),
        keys.doorbell(MODEL),
        keys.STATS,
        keys.GATEWAYS,
        receipt,
    ]
    args = argv(store.claim_args("node-a", 2))
    first = await store.scripts.claim(keys=call_keys, args=args)
    again = await store.scripts.claim(keys=call_keys, args=args)
    assert [job[2] for job in first] == [spec.job_id.encode() for spec in specs[:2]]
    assert again == first
    # The third job is still queued for someone else; nothing was claimed twice.
    assert await redis.hget(keys.job(specs[2].job_id), "state") == b"queued"
    assert await redis.get(keys.queued_count(MODEL)) == b"1"
    for spec in specs[:2]:
        assert await redis.hget(keys.job(spec.job_id), "attempts") == b"1"


async def test_settling_twice_answers_settled_and_publishes_once(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = _spec(wait=True)
    await fleet.touch(redis, keys.GATEWAYS, "gw")  # its gateway is alive: not an orphan
    await store.enqueue(spec, max_queue=10)
    job = await store.claim(MODEL, "node-a")
    assert job is not None
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.reply_channel("gw"))
    message = protocol.encode(job.job_id, 0, protocol.DONE, b"{}")
    assert await store.finish(job, "node-a", keys.JobState.DONE, result=b"{}", message=message)
    assert await store.finish(job, "node-a", keys.JobState.DONE, result=b"{}", message=message)
    assert await _published(pubsub) == [message]
    assert await redis.hget(keys.STATS, "done") == b"1"
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_resent_cancel_answers_the_state_the_job_was_in(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = _spec()
    await store.enqueue(spec, max_queue=10)
    named = Cancel(
        job_id=spec.job_id,
        token="token-1",
        state="cancelled",
        reason="cancelled",
        status=499,
        message="x",
        job_ttl=60,
        result_ttl=60,
        cancel_prefix=keys.cancel_channel(""),
        reply_prefix=keys.reply_channel(""),
        queue_prefix=keys.QUEUE_PREFIX,
    )
    call = {"keys": [keys.job(spec.job_id), keys.STATS], "args": argv(named)}
    assert await store.scripts.cancel(**call) == b"queued"
    assert await store.scripts.cancel(**call) == b"queued"  # not "cancelled": a 409
    assert await redis.hget(keys.STATS, "cancelled") == b"1"
    # A different cancel call (another client) is told what is true now.
    assert await store.cancel(spec.job_id) == keys.JobState.CANCELLED


async def test_retry_and_hand_back_run_twice_do_it_once(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    first, second = _spec(), _spec()
    await store.enqueue(first, max_queue=10)
    await store.enqueue(second, max_queue=10)
    failing = await store.claim(MODEL, "node-a")
    leaving = await store.claim(MODEL, "node-a")
    assert failing is not None and leaving is not None
    retry_call = {
        "keys": [keys.job(failing.job_id), failing.stream_key, keys.RETRY_INBOX, keys.STATS],
        "args": argv(
            Retry(
                group=keys.GROUP,
                node="node-a",
                entry=failing.entry_id,
                error="boom",
                history='{"error":"boom"}',
            )
        ),
    }
    assert await store.scripts.retry(**retry_call) == 1
    assert await store.scripts.retry(**retry_call) == 1
    assert await redis.lrange(keys.RETRY_INBOX, 0, -1) == [failing.job_id.encode()]

    requeue_call = {
        "keys": [
            keys.job(leaving.job_id),
            leaving.stream_key,
            leaving.stream_key,
            keys.queued_count(MODEL),
            keys.doorbell(MODEL),
            keys.STATS,
            keys.RETRY_INBOX,
        ],
        "args": argv(
            Requeue(
                group=keys.GROUP,
                entry=leaving.entry_id,
                node="node-a",
                reason="node-a shut down",
                history='{"error":"x"}',
                doorbell_cap=DOORBELL_CAP,
                max_attempts=0,
                streamed_error="streamed",
                streamed_status=503,
                streamed_message="{}",
                job_ttl=60,
                result_ttl=60,
                reply_prefix=keys.reply_channel(""),
            )
        ),
    }
    assert await store.scripts.requeue(**requeue_call) == 1
    assert await store.scripts.requeue(**requeue_call) == 1
    assert await redis.get(keys.queued_count(MODEL)) == b"1"
    assert await redis.hget(keys.STATS, "requeued") == b"1"
    assert await _entries(redis) == 3  # two first entries and one from the single requeue


# -- the messages the scripts publish: built by corral.protocol, sent once -------------


async def test_a_claim_tells_each_gateway_once_that_its_queued_job_expired_or_was_orphaned(
    redis: Redis,
) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60, gateway_ttl=30)
    late, orphan = _spec(wait=True), _spec(wait=True, gateway_id="gone")
    await fleet.touch(redis, keys.GATEWAYS, "gw")  # alive; "gone" never heartbeated
    for spec in (late, orphan):
        await store.enqueue(spec, max_queue=10)
    await redis.hset(keys.job(late.job_id), "deadline", "1.0")  # long past, on any clock
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.reply_channel("gw"), keys.reply_channel("gone"))
    call = {
        "keys": [
            *keys.streams(MODEL),
            keys.queued_count(MODEL),
            keys.doorbell(MODEL),
            keys.STATS,
            keys.GATEWAYS,
            keys.claim_receipt(MODEL, uuid.uuid4().hex),
        ],
        "args": argv(store.claim_args("node-a", 2)),
    }
    assert await store.scripts.claim(**call) == []
    assert await store.scripts.claim(**call) == []  # the re-sent copy ends nothing more

    assert await _published(pubsub) == [
        protocol.encode_error(
            late.job_id, protocol.UNSEQUENCED, "job expired before a node could start it", 408
        ),
        protocol.encode_error(orphan.job_id, protocol.UNSEQUENCED, ORPHANED, 503),
    ]
    assert await redis.hmget(keys.job(late.job_id), "state", "status") == [b"expired", b"408"]
    assert await redis.hmget(keys.job(orphan.job_id), "state", "status") == [
        b"cancelled",
        b"503",
    ]
    assert await redis.hmget(keys.STATS, "expired", "orphaned") == [b"1", b"1"]
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_streamed_job_handed_back_fails_and_its_gateway_is_told_once(
    redis: Redis,
) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = _spec(wait=True, stream=True)
    await fleet.touch(redis, keys.GATEWAYS, "gw")
    await store.enqueue(spec, max_queue=10)
    job = await store.claim(MODEL, "node-a")
    assert job is not None
    await redis.hset(keys.job(job.job_id), "streamed", 1)  # its client has part of it
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.reply_channel("gw"))
    for _ in range(2):
        outcome = await store.requeue(
            job.job_id, MODEL, 5, job.entry_id, "node-a", "node-a shut down"
        )
        assert outcome == 2
    error = "node-a shut down after part of the answer was streamed"
    assert await _published(pubsub) == [
        protocol.encode_error(job.job_id, protocol.UNSEQUENCED, error, 503)
    ]
    assert await redis.hmget(keys.job(job.job_id), "state", "status") == [b"failed", b"503"]
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_streamed_job_taken_back_with_resumption_is_queued_again_once(
    redis: Redis,
) -> None:
    # The scheduler taking back what a dead node held, with CORRAL_RESUME_STREAMS on: the
    # next node continues the answer, so the job is queued (its attempt counted), not failed.
    store = JobStore(redis, job_ttl=60, result_ttl=60, resume_streams=True)
    spec = _spec(wait=True, stream=True)
    await fleet.touch(redis, keys.GATEWAYS, "gw")
    await store.enqueue(spec, max_queue=10)
    job = await store.claim(MODEL, "node-a")
    assert job is not None
    await redis.hset(keys.job(job.job_id), "streamed", 1)
    for _ in range(2):
        outcome = await store.requeue(job.job_id, MODEL, 5, job.entry_id, "", "node-a died")
        assert outcome == 1
    assert await redis.hmget(keys.job(job.job_id), "state", "attempts") == [b"queued", b"1"]
    again = await store.claim(MODEL, "node-b")
    assert again is not None and again.job_id == job.job_id and again.attempt == 2


async def test_burying_and_cancelling_tell_the_gateway_once(redis: Redis, redis_url: str) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    dying, leaving = _spec(wait=True), _spec(wait=True)
    await fleet.touch(redis, keys.GATEWAYS, "gw")
    for spec in (dying, leaving):
        await store.enqueue(spec, max_queue=10)
    job = await store.claim(MODEL, "node-a")
    assert job is not None and job.job_id == dying.job_id
    assert await store.retry(job, "node-a", "boom", 500)
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.reply_channel("gw"))

    def bury_twice() -> None:
        client = redis_sync.Redis.from_url(redis_url)
        try:
            for _ in range(2):
                retry_job._bury(client, dying.job_id, "dead", "gave up", 503, 60, 60, 600)
        finally:
            client.close()

    await asyncio.to_thread(bury_twice)
    assert await store.cancel(leaving.job_id, "client went away") == keys.JobState.QUEUED

    assert await _published(pubsub) == [
        protocol.encode_error(dying.job_id, protocol.UNSEQUENCED, "gave up", 503),
        protocol.encode_error(leaving.job_id, protocol.UNSEQUENCED, "client went away", 499),
    ]
    assert await redis.hget(keys.job(dying.job_id), "state") == b"dead"
    assert 0 < await redis.ttl(keys.job(dying.job_id)) <= 600  # a dead letter expires too
    assert await redis.hget(keys.STATS, "dead") == b"1"
    await pubsub.aclose()  # type: ignore[no-untyped-call]


# -- the embedded Redis (``make demo`` without redis-server) runs every script ---------


async def test_every_script_runs_on_the_embedded_redis() -> None:
    """fakeredis's Lua has ``cjson`` (no ``cmsgpack``): each script's arguments unpack
    there and each transition lands. Semantics are tested on real Redis above."""
    pytest.importorskip("fakeredis")
    with EmbeddedRedis() as server:
        server.preload_scripts()
        redis = Redis.from_url(server.url)
        try:
            await _every_script(redis, server.url)
        finally:
            await redis.aclose()


async def _every_script(redis: Redis, url: str) -> None:
    await fleet.publish_heartbeat(redis, {"node_id": "node-a", "models": []}, ttl=30)
    assert await redis.zscore(keys.NODES, "node-a")
    assert b'"models":[]' in await redis.get(keys.node("node-a"))
    await fleet.touch(redis, keys.GATEWAYS, "gw")
    lease = Lease(redis, "scheduler-a", ttl=30)
    assert await lease.acquire_or_renew()
    assert await lease.acquire_or_renew()  # renewed by the script
    await lease.release()
    assert not await redis.exists(keys.SCHEDULER_LEASE)

    store = JobStore(redis, job_ttl=60, result_ttl=60)
    specs = [_spec(wait_limit=30.0, run_timeout=2.5) for _ in range(4)]
    for spec in specs:
        await store.enqueue(spec, max_queue=10)
    jobs = await store.claim_many(MODEL, "node-a", 3)
    assert [job.job_id for job in jobs] == [spec.job_id for spec in specs[:3]]
    assert jobs[0].run_timeout == 2.5
    done, failing, leaving = jobs
    message = protocol.encode(done.job_id, 0, protocol.DONE, b"{}")
    assert await store.finish(done, "node-a", keys.JobState.DONE, result=b"{}", message=message)
    assert await store.retry(failing, "node-a", "boom", 500)
    assert await store.requeue(leaving.job_id, MODEL, 5, leaving.entry_id, "node-a", "bye") == 1
    assert await store.cancel(specs[3].job_id) == keys.JobState.QUEUED

    def revive_and_bury() -> None:
        client = redis_sync.Redis.from_url(url)
        try:
            retry_job._requeue(client, failing.job_id, MODEL, "5", ("retrying",), reset=False)
            assert client.hget(keys.job(failing.job_id), "state") == b"queued"
            assert client.hset(keys.job(failing.job_id), "state", "retrying") == 0
            retry_job._bury(client, failing.job_id, "dead", "gave up", 503, 60, 60, 600)
        finally:
            client.close()

    await asyncio.to_thread(revive_and_bury)
    states = [await redis.hget(keys.job(spec.job_id), "state") for spec in specs]
    assert states == [b"done", b"dead", b"queued", b"cancelled"]
