"""Counters the fake keeps so tests can prove what happened on the wire."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

STARTED_LOG_LIMIT = 10_000
RUNS_LIMIT = 100_000
"""Request fingerprints remembered in the run registry; the oldest are forgotten first."""
RUN_TIMES_LIMIT = 32
# Outcome and event counters; `active` and `waiting` are gauges, not counters.
# `garbage`: answers spoiled on purpose; `slow_ps`: /api/ps answers held back.
COUNTERS = ("completed", "failed", "disconnects", "loads", "evictions", "garbage", "slow_ps")


def fingerprint(model: str, prompt: str) -> str:
    """The key of one request in the run registry: its model and its prompt."""
    return hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()[:20]


@dataclass
class Run:
    """What happened to every generation of one request (one fingerprint) on this node.

    A continuation (a chat whose last message is the unfinished answer, as a node sends
    after another died mid-stream) generates only the rest of an answer: it is counted in
    ``continued``, not as a start or completion of the whole answer."""

    model: str
    prompt: str
    started: int = 0
    completed: int = 0
    garbage: int = 0
    continued: int = 0
    started_at: list[float] = field(default_factory=list)
    completed_at: list[float] = field(default_factory=list)
    garbage_at: list[float] = field(default_factory=list)
    continued_at: list[float] = field(default_factory=list)

    def as_dict(self, key: str) -> dict[str, Any]:
        return {
            "fingerprint": key,
            "model": self.model,
            "prompt": self.prompt,
            "started": self.started,
            "completed": self.completed,
            "garbage": self.garbage,
            "continued": self.continued,
            "started_at": list(self.started_at),
            "completed_at": list(self.completed_at),
            "garbage_at": list(self.garbage_at),
            "continued_at": list(self.continued_at),
        }


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
    garbage: int = 0
    slow_ps: int = 0

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
        self.runs: OrderedDict[str, Run] = OrderedDict()
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

    def run_entry(self, model: str, prompt: str) -> str:
        """The fingerprint of this request, with a run record for it (created if new)."""
        key = fingerprint(model, prompt)
        if key not in self.runs:
            self.runs[key] = Run(model, prompt)
            if len(self.runs) > RUNS_LIMIT:
                self.runs.popitem(last=False)
        return key

    def run_started(self, model: str, prompt: str, *, continued: bool = False) -> str:
        """Count a generation of this request as started (or a continuation of its
        answer); returns its fingerprint."""
        key = self.run_entry(model, prompt)
        run = self.runs[key]
        if continued:
            run.continued += 1
            _stamp(run.continued_at)
        else:
            run.started += 1
            _stamp(run.started_at)
        self._on_change()
        return key

    def run_ended(self, key: str, outcome: str) -> None:
        """Count a generation as ``completed`` (its done line went out) or ``garbage``."""
        run = self.runs.get(key)
        if run is None:
            return  # forgotten (reset or past RUNS_LIMIT) while it ran
        if outcome == "continued":
            pass  # counted when it started
        elif outcome == "completed":
            run.completed += 1
            _stamp(run.completed_at)
        else:
            run.garbage += 1
            _stamp(run.garbage_at)
        self._on_change()

    def runs_snapshot(self) -> list[dict[str, Any]]:
        return [run.as_dict(key) for key, run in self.runs.items()]

    def reset(self) -> None:
        self.total.zero()
        for counters in self.models.values():
            counters.zero()
        self.started.clear()
        self.runs.clear()
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


def _stamp(times: list[float]) -> None:
    if len(times) < RUN_TIMES_LIMIT:
        times.append(time.time())
