"""Background loops that survive their own errors, and the health record they keep.

Every periodic loop of a process (heartbeat, fleet view, listeners, sweepers) runs
through ``every`` or reports to ``LoopHealth`` itself: any exception is logged and the
loop goes on after a backoff, so one bad reply (an ``OutOfMemoryError`` while Redis
refuses writes, a garbage answer) cannot end it for good. ``/healthz`` reads the health
record: a loop whose last success is older than its ``stale_after`` turns it 503.

A loop task that still ends (a bug) is seen by ``watch``, which the process's main
awaits beside its work: it raises ``LoopDied`` so the process exits non-zero and
systemd restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.errors import CorralError

log = logging.getLogger(__name__)


class LoopDied(CorralError):
    """A background task that must run for the life of the process ended."""


@dataclass(slots=True)
class _Entry:
    stale_after: float
    last_ok: float | None = None
    last_error: str = ""
    failures: int = 0


@dataclass
class LoopHealth:
    """When each named loop of this process last succeeded (monotonic clock)."""

    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    _loops: dict[str, _Entry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def register(self, name: str, stale_after: float) -> None:
        self._loops.setdefault(name, _Entry(stale_after))

    def ok(self, name: str) -> None:
        entry = self._loops.get(name)
        if entry is not None:
            entry.last_ok = self.clock()
            entry.failures = 0

    def failed(self, name: str, error: BaseException) -> None:
        entry = self._loops.get(name)
        if entry is not None:
            entry.failures += 1
            entry.last_error = f"{type(error).__name__}: {error}"

    def stale(self) -> list[str]:
        """Names of loops whose last success (or start, if none yet) is too old."""
        now = self.clock()
        return [
            name
            for name, entry in self._loops.items()
            if now - (entry.last_ok if entry.last_ok is not None else self.started)
            > entry.stale_after
        ]

    def report(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        stale = set(self.stale())
        out: dict[str, dict[str, Any]] = {}
        for name, entry in sorted(self._loops.items()):
            age = None if entry.last_ok is None else round(now - entry.last_ok, 3)
            item: dict[str, Any] = {"ok": name not in stale, "last_success_age": age}
            if entry.failures:
                item["failures"] = entry.failures
                item["last_error"] = entry.last_error
            out[name] = item
        return out


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with equal jitter: half fixed, half random, capped. One shape for
    every wait after a failure (background loops, resubscriptions, claims, job retries)."""

    base: float = 0.2
    cap: float = 5.0

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """The wait after the ``failures``-th failure in a row (1 for the first)."""
        ceiling = min(self.cap, self.base * 2 ** max(failures - 1, 0))
        spread = (rng or _RANDOM).uniform(0, ceiling / 2)
        return float(ceiling / 2 + spread)


_RANDOM = random.Random()


async def every(
    name: str,
    interval: float,
    action: Callable[[], Awaitable[object]],
    health: LoopHealth,
    *,
    stale_after: float | None = None,
    backoff: Backoff = Backoff(),
) -> None:
    """Run ``action`` every ``interval`` seconds for ever, whatever it raises.

    Cancellation ends the loop (it is how processes stop it); any other exception is
    logged with its traceback once per streak and retried after a backoff.
    """
    health.register(name, stale_after if stale_after is not None else max(3 * interval, 5.0))
    failures = 0
    await asyncio.sleep(interval)  # a period
    while True:
        try:
            await action()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            health.failed(name, exc)
            if failures == 1:
                log.warning("%s failed, will retry: %r", name, exc, exc_info=exc)
            else:
                log.warning("%s failed again (%d in a row): %r", name, failures, exc)
            await asyncio.sleep(min(interval, backoff.delay(failures)))  # backoff
            continue
        if failures:
            log.info("%s recovered after %d failure(s)", name, failures)
        failures = 0
        health.ok(name)
        await asyncio.sleep(interval)  # a period, not synchronisation


async def watch(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Wait until any of ``tasks`` ends, then raise ``LoopDied`` naming it.

    Background loops are meant to run until cancelled; one that returns or raises is a
    bug that would leave the process half alive (heartbeating but deaf, say). The caller
    awaits this beside its main work and lets ``LoopDied`` end the process.
    """
    pending = list(tasks)
    if not pending:
        await asyncio.Event().wait()  # nothing to watch: wait until cancelled
    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    task = next(iter(done))
    if task.cancelled():
        raise LoopDied(f"background task {task.get_name()} was cancelled")
    exc = task.exception()
    if exc is not None:
        raise LoopDied(f"background task {task.get_name()} died: {exc!r}") from exc
    raise LoopDied(f"background task {task.get_name()} returned")
