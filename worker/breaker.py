"""A circuit breaker for one node's Ollama.

``threshold`` backend failures within ``window`` seconds open it: the node stops claiming,
so its jobs go to the other nodes instead of failing here one attempt after another.
After ``cooldown`` seconds it is half-open: the node claims one job, the probe. The
probe's success closes the breaker; its failure opens it again for another cool-down; a
probe that ends neither way (cancelled, handed back) lets the next claim probe instead.

Times are this process's monotonic clock: the breaker compares nothing across hosts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Any


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    def __init__(
        self,
        *,
        threshold: int,
        window: float,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.window = window
        self.cooldown = cooldown
        self.clock = clock
        self._failures: deque[float] = deque()
        self._opened_at: float | None = None
        self._probe: str | None = None
        self.trips = 0
        """Times the breaker opened (a failed probe counts again)."""
        self.total_failures = 0

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self._opened_at < self.cooldown:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def reopens_in(self) -> float:
        """Seconds until an open breaker turns half-open (0 when it is not open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self.clock())

    def allowance(self, wanted: int) -> int:
        """How many of ``wanted`` jobs the node may claim now."""
        state = self.state
        if state is BreakerState.CLOSED:
            return wanted
        if state is BreakerState.HALF_OPEN and self._probe is None:
            return min(wanted, 1)
        return 0

    def claimed(self, job_id: str) -> None:
        """A job was claimed; in the half-open state it is the probe."""
        if self.state is BreakerState.HALF_OPEN and self._probe is None:
            self._probe = job_id

    def succeeded(self, job_id: str) -> None:
        if self._probe == job_id or self.state is BreakerState.HALF_OPEN:
            self._close()

    def failed(self, job_id: str) -> None:
        """A backend failure (Ollama down, 5xx, garbage, a stream cut short)."""
        now = self.clock()
        self.total_failures += 1
        if self._probe == job_id:
            self._open(now)
            return
        if self._opened_at is not None:
            return  # already open: a job claimed before it opened, ending now
        self._failures.append(now)
        while self._failures and self._failures[0] < now - self.window:
            self._failures.popleft()
        if self.enabled and len(self._failures) >= self.threshold:
            self._open(now)

    def recent_failures(self) -> int:
        """Failures within the window, while closed (always 0 while the breaker is off)."""
        if not self.enabled:
            return 0
        cutoff = self.clock() - self.window
        while self._failures and self._failures[0] < cutoff:
            self._failures.popleft()
        return len(self._failures)

    def released(self, job_id: str) -> None:
        """A job ended with no verdict on the node (cancelled, handed back)."""
        if self._probe == job_id:
            self._probe = None

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._probe = None
        self._failures.clear()
        self.trips += 1

    def _close(self) -> None:
        self._opened_at = None
        self._probe = None
        self._failures.clear()

    def report(self) -> dict[str, Any]:
        """The heartbeat's ``breaker`` field."""
        return {
            "state": self.state.value,
            "recent_failures": self.recent_failures(),
            "failures": self.total_failures,
            "trips": self.trips,
            "reopens_in": round(self.reopens_in(), 3),
            "threshold": self.threshold,
            "window": self.window,
            "cooldown": self.cooldown,
        }
