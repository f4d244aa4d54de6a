"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any], *, every: float = 0.1) -> None:
    """Cancel a helper task and wait until it has really ended.

    redis-py 8's asyncio client can swallow a cancellation that lands in the middle of a
    command (measured: about half the time in a tight loop), leaving the task running;
    so cancel again until it is done. Our own cancellation is never swallowed:
    ``asyncio.wait`` lets it propagate.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=every)
    if not task.cancelled() and task.exception() is not None:
        log.error("%s ended with an error", task.get_name(), exc_info=task.exception())
