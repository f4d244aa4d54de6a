"""Counters the fake keeps so tests can prove what happened on the wire."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

STARTED_LOG_LIMIT = 10_000
# Outcome and event counters; `active` and `waiting` are gauges, not counters.
COUNTERS = ("completed", "failed", "disconnects", "loads", "evictions")


@dataclass
class Counters:
    active: int = 0
    max_active: int = 0
    waiting: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    disconnects: int = 0
    loads: int = 0
    evictions: int = 0

    def zero(self) -> None:
        """Forget history but keep the gauges, which describe requests still in flight."""
        self.max_active = self.active
        self.requests = {}
        for name in COUNTERS:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "max_active": self.max_active,
            "waiting": self.waiting,
            "requests": dict(self.requests),
            **{name: getattr(self, name) for name in COUNTERS},
        }


class Stats:
    """Totals plus one Counters per model; `on_change` fires after every update."""

    def __init__(self, models: Iterable[str], on_change: Callable[[], None]) -> None:
        self.total = Counters()
        self.models: dict[str, Counters] = {name: Counters() for name in models}
        self.started: deque[dict[str, Any]] = deque(maxlen=STARTED_LOG_LIMIT)
        self._next_id = 0
        self._on_change = on_change

    def changed(self) -> None:
        """Tell waiters that something observable (e.g. the loaded set) changed."""
        self._on_change()

    def ensure_model(self, model: str) -> None:
        self.models.setdefault(model, Counters())

    def count_request(self, endpoint: str, model: str | None) -> None:
        """Count a request under its path, e.g. "/api/generate"."""
        for counters in self._targets(model):
            counters.requests[endpoint] = counters.requests.get(endpoint, 0) + 1
        self._on_change()

    def add(self, name: str, model: str | None, amount: int = 1) -> None:
        for counters in self._targets(model):
            setattr(counters, name, getattr(counters, name) + amount)
        self._on_change()

    def change_waiting(self, model: str, delta: int) -> None:
        for counters in self._targets(model):
            counters.waiting += delta
        self._on_change()

    def change_active(self, model: str, delta: int) -> None:
        for counters in self._targets(model):
            counters.active += delta
            counters.max_active = max(counters.max_active, counters.active)
        self._on_change()

    def log_start(self, endpoint: str, model: str, prompt: str) -> int:
        self._next_id += 1
        entry = {"id": self._next_id, "model": model, "prompt": prompt, "t": time.time()}
        self.started.append({**entry, "endpoint": endpoint})
        self._on_change()
        return self._next_id

    def reset(self) -> None:
        self.total.zero()
        for counters in self.models.values():
            counters.zero()
        self.started.clear()
        self._on_change()

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.total.as_dict(),
            "models": {name: counters.as_dict() for name, counters in self.models.items()},
            "started": [dict(entry) for entry in self.started],
        }

    def _targets(self, model: str | None) -> list[Counters]:
        if model is None:
            return [self.total]
        return [self.total, self.models.setdefault(model, Counters())]
