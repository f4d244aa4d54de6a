"""The fleet's load as the active scheduler publishes it, and what gateways read from it.

The scheduler measures, each pass, the live slots, the jobs running and queued, and the
rate at which each model's queue drains while it has a backlog; from them it computes
the degradation level (``corral.scheduler.levels``) and writes this report under
``keys.LOAD`` with a TTL. Gateways read it with their fleet view, once per refresh, so
a request pays nothing for it; the same figures estimate a new job's queue wait and the
``Retry-After`` of every refusal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from corral import keys

LEVEL_NAMES = ("normal", "minor", "major", "critical")

UNKNOWN_RETRY = 1.0
"""Seconds a refusal suggests when no drain rate has been measured yet (what every
refusal said before drain rates were measured)."""


@dataclass(slots=True, frozen=True)
class ModelLoad:
    rate: float
    """Jobs per second this model's queue drained while it had a backlog (0: unmeasured)."""
    ahead: tuple[int, ...] = (0,) * len(keys.PRIORITIES)
    """Queued jobs at priority ``p`` or more urgent, for each ``p``: what a new job of
    priority ``p`` waits behind."""


@dataclass(slots=True, frozen=True)
class LoadReport:
    level: int = 0
    load: float = 0.0
    """The figure the level follows: the larger of ``occupancy`` and ``wait`` over the
    wait counted as full load."""
    occupancy: float = 0.0
    """(queued + running) / (live slots x jobs per slot counted as full)."""
    wait: float = 0.0
    """Expected queue wait of the worst backlogged model, seconds."""
    slots: int = 0
    running: int = 0
    queued: int = 0
    rate: float = 0.0
    """Jobs per second the whole fleet drains (sum of the models' measured rates)."""
    retry_after: float = 0.0
    """Seconds until the load is expected to fall out of the current level."""
    at: float = 0.0
    """Redis time of the measurement."""
    ttl: float = 0.0
    """Seconds the report is valid; a gateway that cannot re-read it keeps it no longer."""
    models: dict[str, ModelLoad] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return LEVEL_NAMES[self.level]

    def queue_wait(self, model: str, priority: int) -> float | None:
        """Seconds a new job of ``model`` at ``priority`` is expected to wait for a slot
        (None: no drain rate measured for the model yet)."""
        figures = self.models.get(model)
        if figures is None or figures.rate <= 0:
            return None
        return figures.ahead[priority] / figures.rate

    def drain_seconds(self, model: str, jobs: int) -> float:
        """Seconds the fleet needs to drain ``jobs`` of ``model`` (or of all models when
        the model has no measured rate)."""
        figures = self.models.get(model)
        rate = figures.rate if figures is not None and figures.rate > 0 else self.rate
        return jobs / rate if rate > 0 else UNKNOWN_RETRY

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str | None) -> LoadReport:
        """The report in ``raw``; the empty report (level 0) for a missing or bad one."""
        if not raw:
            return NO_LOAD
        try:
            data: dict[str, Any] = orjson.loads(raw)
            models = {
                str(name): ModelLoad(float(m["rate"]), tuple(int(n) for n in m["ahead"]))
                for name, m in data.pop("models", {}).items()
            }
            report = cls(**data, models=models)
        except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError, ValueError):
            return NO_LOAD  # written by another version, or damaged: not worth a refusal
        if not 0 <= report.level < len(LEVEL_NAMES) or any(
            len(m.ahead) != len(keys.PRIORITIES) for m in models.values()
        ):
            return NO_LOAD
        return report


NO_LOAD = LoadReport()


def retry_after(seconds: float, ceiling: float) -> str:
    """A ``Retry-After`` header value: whole seconds, at least 1, at most ``ceiling``."""
    if not math.isfinite(seconds):
        seconds = ceiling
    return str(max(1, math.ceil(min(seconds, ceiling))))
