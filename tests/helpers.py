"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from corral import keys

T = TypeVar("T")


async def until(
    probe: Callable[[], Awaitable[object]], expected: object, within: float = 10.0
) -> None:
    """Poll ``probe`` until it returns ``expected``, failing after ``within`` seconds.

    For state that lives in another system (Redis, an HTTP API) and offers no event to
    wait on: a deadline-bound poll, never a fixed sleep standing in for synchronisation.
    """
    async with asyncio.timeout(within):
        while (value := await probe()) != expected:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.01)
    assert value == expected


async def until_value(probe: Callable[[], Awaitable[T]], within: float = 10.0) -> T:
    """Poll ``probe`` until it returns something truthy, and return that (deadline-bound)."""
    async with asyncio.timeout(within):
        while not (value := await probe()):  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.05)
    return value


def record_requests(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """The request body of every job enqueued from now on, by job id (a finished job's
    record no longer holds it)."""
    from corral.jobs import JobSpec, JobStore

    seen: dict[str, bytes] = {}
    enqueue = JobStore.enqueue

    async def recording(self: JobStore, spec: JobSpec, *, max_queue: int) -> int:
        seen[spec.job_id] = spec.request
        return await enqueue(self, spec, max_queue=max_queue)

    monkeypatch.setattr(JobStore, "enqueue", recording)
    return seen


async def held_bytes(redis: Redis, tenant: str) -> int:
    """The bytes a tenant (an API key's id) holds in Redis, as its quota is checked."""
    return int(await redis.get(keys.tenant_bytes(tenant)) or 0)
