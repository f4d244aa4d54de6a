"""One pub/sub subscription that notices when its connection silently dies.

A subscribed connection waits for Redis to speak first, so a TCP connection that died
without a FIN or RST (a NAT or firewall that forgot the flow, a host that vanished, a
Redis frozen behind a proxy) looks exactly like a quiet channel: the gateway went on
heartbeating while deaf to every reply, a worker deaf to every cancellation. So the
subscription pings Redis on its own connection every ``ping_interval`` (Redis answers a
subscribed client's PING with a ``pong`` message) and, once nothing at all (message or
pong) has arrived for ``dead_after`` seconds, drops the connection and subscribes again
on a new one. Pub/sub is at-most-once: after each re-subscription, once Redis has
confirmed it, the owner's ``on_resubscribed`` hook recovers from Redis whatever was
published meanwhile.

It never dies: any error but cancellation is logged and the subscription starts over
after a backoff (a hook that fails runs again after the next subscription); a handler
that raises loses that one message, not the subscription. Each pong is recorded in a
``LoopHealth``, so ``/healthz`` tells when the subscription has not got through lately.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from corral.errors import CorralError
from corral.loops import Backoff, LoopHealth
from corral.tasks import cancel_and_wait

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0
"""Seconds between pings on the subscribed connection."""

DEAD_AFTER = 3.0
"""Seconds of silence (no message, no pong) after which the connection counts as dead.
Three missed pongs: a false alarm costs one re-subscription and one replay, both safe."""

RESUBSCRIBE_BACKOFF = Backoff(base=0.2, cap=5.0)
"""Pause before subscribing again: 0.1-0.2 s after a loss, growing while Redis is away."""

CLOSE_TIMEOUT = 2.0
"""Most seconds spent closing a connection already given up on."""


class SubscriptionLost(CorralError):
    """The subscribed connection went silent or ended; it is dropped and replaced."""


class Subscription:
    """Listen on one channel for the life of the process; run it with ``await run()``.

    ``client`` should come from ``connections.subscriber``: a client that does not
    reconnect on its own, so that every lost connection passes through here and the
    ``on_resubscribed`` hook. ``on_message`` gets each message's payload; it is called
    in the reading task, so it must be quick and must not block.
    """

    def __init__(
        self,
        client: Redis,
        channel: str,
        on_message: Callable[[bytes], object],
        health: LoopHealth,
        *,
        name: str,
        on_resubscribed: Callable[[], Coroutine[Any, Any, object]] | None = None,
        ping_interval: float = PING_INTERVAL,
        dead_after: float = DEAD_AFTER,
        stale_after: float | None = None,
        backoff: Backoff = RESUBSCRIBE_BACKOFF,
    ) -> None:
        if dead_after <= ping_interval:
            raise ValueError("dead_after must be longer than ping_interval")
        self.client = client
        self.channel = channel
        self.on_message = on_message
        self.on_resubscribed = on_resubscribed
        self.health = health
        self.name = name
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.stale_after = stale_after if stale_after is not None else 2 * dead_after
        self.backoff = backoff
        self.subscribed = asyncio.Event()
        """Set once Redis first confirms the subscription; stays set."""
        self.resubscriptions = 0
        """How many times the subscription was replaced and its hook ran."""
        self._heard = 0.0
        self._up = False
        self._confirmed = asyncio.Event()
        self._handler_failures = 0

    async def run(self) -> None:
        """Subscribe, and subscribe again whenever the connection is lost, until cancelled."""
        self.health.register(self.name, self.stale_after)
        failures = 0
        while True:
            pubsub = self.client.pubsub()
            self._up = False
            try:
                # Once we have been subscribed, every new subscription may have missed
                # something: recover after each (again after a failed recovery).
                await self._session(pubsub, recover=self.subscribed.is_set())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                lost: Exception = exc
            finally:
                await _close(pubsub)
            failures = 1 if self._up else failures + 1
            self.health.failed(self.name, lost)
            if failures == 1:
                log.warning("%s lost, subscribing again: %r", self.name, lost)
            else:
                log.warning("%s still down (%d tries): %r", self.name, failures, lost)
            await asyncio.sleep(self.backoff.delay(failures))  # backoff

    async def _session(self, pubsub: PubSub, *, recover: bool) -> NoReturn:
        """One connection's life: subscribe, recover if asked, then ping until it dies."""
        self._confirmed.clear()
        await pubsub.subscribe(self.channel)
        self._heard = asyncio.get_running_loop().time()
        reader = asyncio.create_task(self._read(pubsub), name=f"{self.name}-reader")
        hook: asyncio.Task[object] | None = None
        try:
            await self._wait_confirmed(reader)
            if recover and self.on_resubscribed is not None:
                # Beside the pings, not before them: a long replay must not read as silence.
                hook = asyncio.create_task(self.on_resubscribed(), name=f"{self.name}-recover")
            else:
                self._subscribed(again=recover)
            await self._keep_alive(pubsub, reader, hook)
        finally:
            for task in (hook, reader):
                if task is not None and not task.done():
                    await cancel_and_wait(task)

    async def _wait_confirmed(self, reader: asyncio.Task[None]) -> None:
        """Wait for Redis to confirm the subscription, or fail as a silent connection."""
        confirmed = asyncio.create_task(self._confirmed.wait())
        try:
            await asyncio.wait(
                [reader, confirmed], timeout=self.dead_after, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            confirmed.cancel()
        if reader.done():
            reader.result()  # raises what ended it
            raise SubscriptionLost(f"{self.channel}: the connection ended while subscribing")
        if not self._confirmed.is_set():
            raise SubscriptionLost(f"{self.channel}: Redis did not confirm the subscription")

    async def _keep_alive(
        self, pubsub: PubSub, reader: asyncio.Task[None], hook: asyncio.Task[object] | None
    ) -> NoReturn:
        """Ping every ``ping_interval``; raise once the connection ends or falls silent."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time()
        while True:
            now = loop.time()
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + self.ping_interval
            wake = min(next_ping, self._heard + self.dead_after)
            await asyncio.wait(
                [reader] if hook is None else [reader, hook],
                timeout=max(wake - loop.time(), 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if reader.done():
                reader.result()  # raises what ended it
                raise SubscriptionLost(f"{self.channel}: the subscription ended")
            if hook is not None and hook.done():
                hook.result()  # a failed recovery ends the session: recover again after
                hook = None
                self._subscribed(again=True)
            silent = loop.time() - self._heard
            if silent > self.dead_after:
                raise SubscriptionLost(f"{self.channel}: nothing from Redis for {silent:.1f}s")

    def _subscribed(self, *, again: bool) -> None:
        if again:
            self.resubscriptions += 1
            log.info("%s subscribed again to %s and recovered", self.name, self.channel)
        self._up = True
        self.subscribed.set()
        self.health.ok(self.name)

    async def _read(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        async for message in pubsub.listen():
            self._heard = loop.time()
            kind = message["type"]
            if kind == "message":
                self._deliver(message["data"])
            elif kind == "pong":
                self.health.ok(self.name)
            elif kind == "subscribe":
                self._confirmed.set()

    def _deliver(self, data: bytes) -> None:
        try:
            self.on_message(data)
        except Exception as exc:
            # A bad message (a bug, or garbage on the channel) must not take the
            # subscription, and with it every later message, down.
            self._handler_failures += 1
            self.health.failed(self.name, exc)
            log.error(
                "%s: handling a message on %s failed (%d so far): %r",
                self.name,
                self.channel,
                self._handler_failures,
                data[:200],
                exc_info=exc,
            )


async def _close(pubsub: PubSub) -> None:
    """Drop a connection given up on; a dead peer must not hold us here."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
