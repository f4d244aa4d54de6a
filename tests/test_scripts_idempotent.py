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

from redis.asyncio import Redis

from corral import fleet, keys, protocol
from corral.jobs import DOORBELL_CAP, JobSpec, JobStore
from corral.keys import JobKind

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
    args = [keys.GROUP, "node-a", 60, keys.job(""), keys.reply_channel(""), 60, 30, 2, "x", "{}"]
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
    published = []
    loop = asyncio.get_running_loop()
    quiet_until = loop.time() + 0.5  # a second message would arrive well within this
    while loop.time() < quiet_until:
        got = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if got is not None:
            published.append(got["data"])
    assert published == [message]
    assert await redis.hget(keys.STATS, "done") == b"1"
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_resent_cancel_answers_the_state_the_job_was_in(redis: Redis) -> None:
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = _spec()
    await store.enqueue(spec, max_queue=10)
    call = {
        "keys": [keys.job(spec.job_id), keys.STATS],
        "args": [
            spec.job_id, "token-1", 60, "cancelled", keys.cancel_channel(""),
            keys.reply_channel(""), b"x", 60, "cancelled", 499,
        ],
    }  # fmt: skip
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
        "args": [keys.GROUP, "node-a", failing.entry_id, "", "boom", b'{"error":"boom"}'],
    }
    assert await store.scripts.retry(**retry_call) == 1
    assert await store.scripts.retry(**retry_call) == 1
    assert await redis.lrange(keys.RETRY_INBOX, 0, -1) == [failing.job_id.encode()]

    requeue_call = {
        "keys": [
            keys.job(leaving.job_id), leaving.stream_key, leaving.stream_key,
            keys.queued_count(MODEL), keys.doorbell(MODEL), keys.STATS, keys.RETRY_INBOX,
        ],
        "args": [
            keys.GROUP, leaving.entry_id, "node-a", "", "node-a shut down", DOORBELL_CAP, 0,
            keys.reply_channel(""), 60, 60, "streamed", b"{}", b'{"error":"x"}',
        ],
    }  # fmt: skip
    assert await store.scripts.requeue(**requeue_call) == 1
    assert await store.scripts.requeue(**requeue_call) == 1
    assert await redis.get(keys.queued_count(MODEL)) == b"1"
    assert await redis.hget(keys.STATS, "requeued") == b"1"
    assert await _entries(redis) == 3  # two first entries and one from the single requeue
