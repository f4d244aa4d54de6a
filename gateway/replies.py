"""One pub/sub subscription per gateway process, demultiplexed to the requests waiting.

Workers publish a job's chunks and its final message on this gateway's reply channel;
the router hands each to the queue registered for that job id. Pub/sub is
at-most-once, so when the subscription drops the router re-subscribes and then settles,
from the job records, every waiting job that finished meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from redis.asyncio import Redis

from corral import keys, protocol
from corral.connections import TRANSIENT_REDIS_ERRORS
from corral.protocol import Reply
from corral.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DISCONNECTED = Reply("", -1, b"X", b"")
"""Put in a job's inbox when its client goes away."""


class Inbox:
    """The replies of one job, in arrival order, for the one request that waits on them.

    Not an ``asyncio.Queue``: a gateway holds one per waiting request, and an empty Queue
    weighs about 3 KB against this one's few hundred bytes (see the scale benchmark).
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Reply] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, reply: Reply) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(reply)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Reply:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class ReplyRouter:
    def __init__(self, pubsub_client: Redis, redis: Redis, gateway_id: str) -> None:
        self.client = pubsub_client
        self.redis = redis
        self.gateway_id = gateway_id
        self.channel = keys.reply_channel(gateway_id)
        self.waiters: dict[str, Inbox] = {}
        self.subscribed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def register(self, job_id: str) -> Inbox:
        inbox = Inbox()
        self.waiters[job_id] = inbox
        return inbox

    def unregister(self, job_id: str) -> None:
        self.waiters.pop(job_id, None)

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="reply-router")
        await self.subscribed.wait()

    async def stop(self) -> None:
        if self.task is not None:
            await cancel_and_wait(self.task)

    async def _run(self) -> None:
        resubscribed = False
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                if resubscribed:
                    await self._recover()
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._dispatch(message["data"])
            except TRANSIENT_REDIS_ERRORS as exc:
                log.warning("reply subscription lost (%s); resubscribing", exc)
                resubscribed = True
                await asyncio.sleep(0.2)  # back off before reconnecting
            finally:
                with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _dispatch(self, data: bytes) -> None:
        reply = protocol.decode(data)
        queue = self.waiters.get(reply.job_id)
        if queue is not None:
            queue.put_nowait(reply)

    async def _recover(self) -> None:
        """Replay what waiting jobs missed while we were not listening.

        A streamed job's messages are kept in its output list, so they are replayed in
        full (the relay drops the ones it already wrote, by sequence number); any other
        job that finished meanwhile is answered from its record.
        """
        ids = list(self.waiters)
        if not ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.lrange(keys.output(job_id), 0, -1)
                pipe.hmget(keys.job(job_id), "state", "result", "error", "status")
            fetched = await pipe.execute()
        for index, job_id in enumerate(ids):
            output, (state, result, error, status) = fetched[2 * index], fetched[2 * index + 1]
            queue = self.waiters.get(job_id)
            if queue is None:
                continue
            for message in output:
                queue.put_nowait(protocol.decode(message))
            if output and output[-1].split(b" ", 3)[2] != protocol.CHUNK:
                continue  # the replayed stream already ends with its final message
            if state == b"done" and result is not None:
                queue.put_nowait(Reply(job_id, FROM_RECORD, protocol.DONE, result))
            elif state in (b"failed", b"cancelled", b"expired", b"dead"):
                payload = protocol.error_payload(
                    (error or b"job ended").decode(), int(status or 500)
                )
                queue.put_nowait(Reply(job_id, FROM_RECORD, protocol.ERROR, payload))
        log.info("reply router replayed missed replies for %d waiting job(s)", len(ids))


FROM_RECORD = 1 << 30
"""Sequence number of a final reply rebuilt from a job record (after every real one)."""
