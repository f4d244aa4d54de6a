"""The scheduler's trimming: every acknowledged stream entry goes, nothing pending does."""

from __future__ import annotations

from redis.asyncio import Redis

from corral import keys
from corral.scheduler.housekeeping import trim_acknowledged

MODEL = "llama3:latest"
STREAM = keys.stream(MODEL, keys.DEFAULT_PRIORITY)


async def _add(redis: Redis, count: int) -> list[bytes]:
    return [await redis.xadd(STREAM, {"id": f"job{n}"}) for n in range(count)]


async def _deliver(redis: Redis, count: int) -> list[bytes]:
    """Claim ``count`` entries as a worker would; their ids, oldest first."""
    reply = await redis.xreadgroup(keys.GROUP, "node1", {STREAM: ">"}, count=count)
    return [entry_id for entry_id, _ in reply[0][1]]


async def _ids(redis: Redis) -> list[bytes]:
    return [entry_id for entry_id, _ in await redis.xrange(STREAM)]


async def test_a_small_fully_acknowledged_stream_is_trimmed_to_nothing(redis: Redis) -> None:
    await redis.xgroup_create(STREAM, keys.GROUP, "0", mkstream=True)
    await _add(redis, 5)
    delivered = await _deliver(redis, 5)
    assert await redis.xack(STREAM, keys.GROUP, *delivered) == 5

    assert await trim_acknowledged(redis, [MODEL]) == 5
    assert await redis.xlen(STREAM) == 0
    # The group, and with it the stream, stays: the next job is claimed as usual.
    (added,) = await _add(redis, 1)
    assert await _deliver(redis, 1) == [added]


async def test_a_pending_entry_and_everything_after_it_stay(redis: Redis) -> None:
    await redis.xgroup_create(STREAM, keys.GROUP, "0", mkstream=True)
    ids = await _add(redis, 6)
    delivered = await _deliver(redis, 4)  # the last two are never delivered
    running = delivered[2]
    await redis.xack(STREAM, keys.GROUP, *(i for i in delivered if i != running))

    assert await trim_acknowledged(redis, [MODEL]) == 2
    assert await _ids(redis) == ids[2:]  # the pending one, one acknowledged, two queued
    pending = await redis.xpending(STREAM, keys.GROUP)
    assert pending["pending"] == 1 and pending["min"] == running

    # Once it is settled and the rest delivered and settled, all of it goes.
    await redis.xack(STREAM, keys.GROUP, running)
    assert await trim_acknowledged(redis, [MODEL]) == 2
    assert await _ids(redis) == ids[4:]
    rest = await _deliver(redis, 10)
    await redis.xack(STREAM, keys.GROUP, *rest)
    assert await trim_acknowledged(redis, [MODEL]) == 2
    assert await redis.xlen(STREAM) == 0


async def test_streams_without_the_group_or_not_there_are_left_alone(redis: Redis) -> None:
    await _add(redis, 3)  # a stream nobody made a group on: nothing says what was read
    assert await trim_acknowledged(redis, [MODEL, "absent:latest"]) == 0
    assert await redis.xlen(STREAM) == 3
