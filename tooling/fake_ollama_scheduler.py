"""Ollama-like scheduling: loaded models, their parallel slots, loads and LRU eviction.

It follows the shape of Ollama's scheduler: requests enter one FIFO; the head request is
placed on a loaded model (or triggers a load, evicting the least recently used idle model)
before anyone behind it is looked at, so a request that must wait for a reload holds up
the ones behind it, as in Ollama. Once placed, requests wait FIFO for one of the model's
`num_parallel` slots. All of it is driven by state changes; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from corral.tooling.fake_ollama_config import FakeOllamaConfig
from corral.tooling.fake_ollama_stats import Stats


class QueueFullError(Exception):
    """More requests are waiting than OLLAMA_MAX_QUEUE allows."""


class _State(enum.Enum):
    PENDING = "pending"  # in the scheduler FIFO, no model instance yet
    QUEUED = "queued"  # assigned to an instance, waiting for a slot
    GRANTED = "granted"  # holds a slot
    DONE = "done"


@dataclass(eq=False)
class Instance:
    """One loaded (or loading) copy of a model, as a runner process is in Ollama."""

    model: str
    num_ctx: int
    ready_at: float  # monotonic time the load finishes
    last_used: float
    refs: int = 0  # requests assigned to it: queued for a slot or holding one
    busy: int = 0  # slots in use
    queue: deque[Ticket] = field(default_factory=deque)
    expires_at: float | None = None  # monotonic; None while busy or when kept forever
    unload_when_idle: bool = False

    def ready(self, now: float) -> bool:
        return now >= self.ready_at


@dataclass(eq=False)
class Ticket:
    model: str
    num_ctx: int
    granted: asyncio.Future[Instance]
    state: _State = _State.PENDING
    instance: Instance | None = None


@dataclass
class Lease:
    """A held slot on a ready instance."""

    instance: Instance
    load_seconds: float


class Scheduler:
    def __init__(self, config: FakeOllamaConfig, stats: Stats) -> None:
        self._config = config
        self._stats = stats
        self._pending: deque[Ticket] = deque()
        self.instances: dict[str, Instance] = {}

    # -- public operations -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(
        self, model: str, num_ctx: int, keep_alive: float | None
    ) -> AsyncIterator[Lease]:
        """Wait (FIFO) for a slot on a loaded `model` with this `num_ctx`, then hold it."""
        if self._stats.total.waiting >= self._config.max_queue:
            raise QueueFullError
        ticket = Ticket(model, num_ctx, asyncio.get_running_loop().create_future())
        self._stats.change_waiting(model, +1)
        waiting = True
        try:
            self._pending.append(ticket)
            self._pump()
            instance = await ticket.granted
            load_seconds = await self._wait_loaded(instance)
            self._stats.change_waiting(model, -1)
            waiting = False
            yield Lease(instance, load_seconds)
        finally:
            if waiting:
                self._stats.change_waiting(model, -1)
            self._finish(ticket, keep_alive)

    def preload(self, model: str) -> None:
        """Load `model` instantly if there is room (used for the configured start state)."""
        if model in self.instances or len(self.instances) >= self._config.max_loaded_models:
            return
        now = time.monotonic()
        self.instances[model] = Instance(
            model, self._config.context_length, ready_at=now, last_used=now
        )
        self._stats.ensure_model(model)

    def unload(self, model: str) -> None:
        """Unload now if idle, else as soon as its last request finishes (keep_alive: 0)."""
        instance = self.instances.get(model)
        if instance is None:
            return
        if instance.refs == 0:
            self._drop(instance, evicted=False)
            self._pump()
        else:
            instance.unload_when_idle = True

    def ready_instances(self) -> list[Instance]:
        now = time.monotonic()
        self._expire_idle(now)
        return [inst for inst in self.instances.values() if inst.ready(now)]

    def poke(self) -> None:
        """Re-evaluate after a config change (more slots, more room for models)."""
        self._pump()

    # -- internals -------------------------------------------------------------------

    async def _wait_loaded(self, instance: Instance) -> float:
        remaining = instance.ready_at - time.monotonic()
        if remaining <= 0:
            return 0.0
        # Loading is simulated time, not synchronisation: the model is "busy loading".
        await asyncio.sleep(remaining)
        return remaining

    def _pump(self) -> None:
        now = time.monotonic()
        self._expire_idle(now)
        while self._pending:
            ticket = self._pending[0]
            if ticket.granted.done():  # its requester went away before being placed
                self._pending.popleft()
                ticket.state = _State.DONE
                continue
            instance = self._place(ticket, now)
            if instance is None:
                break  # head-of-line: wait for a model to go idle
            self._pending.popleft()
            ticket.state, ticket.instance = _State.QUEUED, instance
            instance.refs += 1
            instance.expires_at = None
            instance.unload_when_idle = False  # a newer request wants it kept
            instance.queue.append(ticket)
        for instance in list(self.instances.values()):
            self._grant_slots(instance)

    def _place(self, ticket: Ticket, now: float) -> Instance | None:
        current = self.instances.get(ticket.model)
        if current is not None:
            if current.num_ctx == ticket.num_ctx:
                return current
            if current.refs > 0:
                return None  # reload with the new num_ctx once it drains
            self._drop(current, evicted=True)
        if len(self.instances) >= self._config.max_loaded_models:
            victim = self._lru_idle()
            if victim is None:
                return None
            self._drop(victim, evicted=True)
        return self._load(ticket.model, ticket.num_ctx, now)

    def _lru_idle(self) -> Instance | None:
        idle = [inst for inst in self.instances.values() if inst.refs == 0]
        return min(idle, key=lambda inst: inst.last_used, default=None)

    def _load(self, model: str, num_ctx: int, now: float) -> Instance:
        instance = Instance(model, num_ctx, ready_at=now + self._config.load_delay, last_used=now)
        self.instances[model] = instance
        self._stats.add("loads", model)
        return instance

    def _drop(self, instance: Instance, *, evicted: bool) -> None:
        if self.instances.get(instance.model) is instance:
            del self.instances[instance.model]
        if evicted:
            self._stats.add("evictions", instance.model)
        else:
            self._stats.changed()

    def _grant_slots(self, instance: Instance) -> None:
        while instance.queue and instance.busy < self._config.num_parallel:
            ticket = instance.queue.popleft()
            if ticket.granted.done():  # cancelled while queued; its cleanup sees DONE
                instance.refs -= 1
                ticket.state = _State.DONE
                if instance.refs == 0:
                    self._went_idle(instance, self._config.keep_alive)
                continue
            instance.busy += 1
            ticket.state = _State.GRANTED
            ticket.granted.set_result(instance)

    def _finish(self, ticket: Ticket, keep_alive: float | None) -> None:
        instance, state = ticket.instance, ticket.state
        ticket.state = _State.DONE
        if state is _State.PENDING:
            self._pending.remove(ticket)
        elif instance is not None and state is _State.QUEUED:
            instance.queue.remove(ticket)
            instance.refs -= 1
        elif instance is not None and state is _State.GRANTED:
            instance.busy -= 1
            instance.refs -= 1
            instance.last_used = time.monotonic()
        if instance is not None and state is not _State.DONE and instance.refs == 0:
            self._went_idle(instance, keep_alive)
        self._pump()

    def _went_idle(self, instance: Instance, keep_alive: float | None) -> None:
        if instance.unload_when_idle or keep_alive == 0:
            self._drop(instance, evicted=False)
        elif keep_alive is not None:
            instance.expires_at = time.monotonic() + keep_alive

    def _expire_idle(self, now: float) -> None:
        # Lazy expiry: an idle model past its keep_alive is gone the next time anyone looks.
        for instance in list(self.instances.values()):
            expires = instance.expires_at
            if instance.refs == 0 and expires is not None and expires <= now:
                self._drop(instance, evicted=False)

    def expires_at(self, instance: Instance) -> float | None:
        """When an instance will unload (monotonic); for a busy one, as if it went idle now."""
        if instance.expires_at is not None:
            return instance.expires_at
        if instance.refs > 0:
            return time.monotonic() + self._config.keep_alive
        return None

    def loaded_summary(self) -> list[dict[str, object]]:
        now = time.monotonic()
        return [
            {
                "model": inst.model,
                "num_ctx": inst.num_ctx,
                "ready": inst.ready(now),
                "busy": inst.busy,
                "queued": len(inst.queue),
            }
            for inst in self.instances.values()
        ]
