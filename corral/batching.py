"""Send the script calls of one event-loop turn to Redis as one pipeline.

Under load a gateway enqueues, and a worker settles, many jobs in the same turn of the
loop. Sent one by one, each costs a socket write, a pooled-connection checkout and a
reply wake-up on both sides; pipelined, the batch pays those once. Alone on the loop, a
call goes out on the next turn, so a lone request waits no longer than before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from corral.scripts import Function, is_missing

MAX_BATCH = 128
"""Most calls in one pipeline; a larger turn is split so no reply waits on a huge batch."""

Call = tuple[Function, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: list[Call] = []
        self._inflight: set[asyncio.Task[None]] = set()

    async def call(self, script: Function, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run ``script`` like ``script(keys=keys, args=args)``, batched with its neighbours.

        A caller cancelled while waiting does not take the call back: like any command
        already on its way to Redis, it may still run.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((script, keys, args, future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_BATCH):
            task = asyncio.create_task(self._send(pending[start : start + MAX_BATCH]))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _send(self, batch: list[Call]) -> None:
        try:
            if len(batch) == 1:
                script, keys, args, future = batch[0]
                _settle(future, await script(keys=keys, args=args))
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    pipe.fcall(script.name, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            for (script, keys, args, future), result in zip(batch, results, strict=True):
                if is_missing(result):  # a Redis that restarted without its functions
                    _settle(future, await _call_alone(script, keys, args))
                else:
                    _settle(future, result)
        except asyncio.CancelledError:
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # the whole batch failed (connection lost): tell every caller
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)


async def _call_alone(script: Function, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """The function's result, or its error as a value (the function object loads the
    library when it is missing)."""
    try:
        return await script(keys=keys, args=args)
    except Exception as exc:
        return exc


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # its caller was cancelled meanwhile
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
