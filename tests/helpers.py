"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

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
