"""One pub/sub subscription per gateway process, demultiplexed to the requests waiting.

Workers publish a job's chunks and its final message on this gateway's reply channel;
the router hands each to the queue registered for that job id. The subscription is a
``corral.subscription.Subscription``: it pings Redis and replaces a connection that fell
silent, so a half-open connection cannot leave the gateway deaf. Pub/sub is
at-most-once, so after each re-subscription the router replays, from the output lists
and job records, whatever its waiting jobs missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from redis.asyncio import Redis

from corral import keys, protocol
from corral.loops import LoopDied, LoopHealth
from corral.protocol import Reply
from corral.subscription import Subscription
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
    """Routes this gateway's replies to the requests waiting for them.

    ``pubsub_client`` should come from ``connections.subscriber``; ``redis`` is the
    pooled client the replay reads with; the subscription's health goes into ``health``
    as ``reply-subscription``.
    """

    def __init__(
        self, pubsub_client: Redis, redis: Redis, gateway_id: str, health: LoopHealth
    ) -> None:
        self.client = pubsub_client
        self.redis = redis
        self.gateway_id = gateway_id
        self.channel = keys.reply_channel(gateway_id)
        self.waiters: dict[str, Inbox] = {}
        self.subscription = Subscription(
            pubsub_client,
            self.channel,
            self._dispatch,
            health,
            name="reply-subscription",
            on_resubscribed=self._recover,
        )
        self.subscribed = self.subscription.subscribed
        """Set once Redis has confirmed the first subscription."""
        self.task: asyncio.Task[None] | None = None
        """The subscription's task, for the process to watch."""

    def register(self, job_id: str) -> Inbox:
        inbox = Inbox()
        self.waiters[job_id] = inbox
        return inbox

    def unregister(self, job_id: str) -> None:
        self.waiters.pop(job_id, None)

    async def start(self) -> None:
        """Start listening; returns once subscribed, so no reply can be published unheard."""
        self.task = asyncio.create_task(self.subscription.run(), name="reply-router")
        subscribed = asyncio.create_task(self.subscribed.wait())
        try:
            await asyncio.wait([subscribed, self.task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            subscribed.cancel()
        if not self.subscribed.is_set():
            raise LoopDied("the reply subscription ended before it subscribed")

    async def stop(self) -> None:
        if self.task is not None:
            await cancel_and_wait(self.task)

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
                pipe.hmget(keys.job(job_id), "state", "result", "error", "status", "replay_cut")
            fetched = await pipe.execute()
        for index, job_id in enumerate(ids):
            output, (state, result, error, status, cut) = fetched[2 * index], fetched[2 * index + 1]
            queue = self.waiters.get(job_id)
            if queue is None:
                continue
            for message in output:
                queue.put_nowait(protocol.decode(message))
            if output and output[-1].split(b" ", 3)[2] != protocol.CHUNK:
                continue  # the replayed stream already ends with its final message
            if cut:
                # Chunks past the replay cap that this gateway missed are nowhere to be
                # had: end the answer now rather than leave a gap the relay would wait
                # on, or repeat what was sent with the record's whole answer.
                payload = protocol.error_payload(
                    "part of a long streamed answer was lost (Redis connection lost); "
                    "please try again",
                    502,
                )
                queue.put_nowait(Reply(job_id, protocol.UNSEQUENCED, protocol.ERROR, payload))
                continue
            if state == b"done" and result is not None:
                queue.put_nowait(Reply(job_id, protocol.UNSEQUENCED, protocol.DONE, result))
            elif state in (b"failed", b"cancelled", b"expired", b"dead"):
                payload = protocol.error_payload(
                    (error or b"job ended").decode(), int(status or 500)
                )
                queue.put_nowait(Reply(job_id, protocol.UNSEQUENCED, protocol.ERROR, payload))
        log.info("reply router replayed missed replies for %d waiting job(s)", len(ids))
