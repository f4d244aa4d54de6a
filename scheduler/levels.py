"""Degradation levels: the active scheduler measures the fleet's load and publishes it.

Each pass reads the live slots (node heartbeats), the jobs running (pending stream
entries) and queued (each stream's undelivered entries, per priority), and how fast each
model's queue drained since the last pass. A model's drain rate is measured only over
intervals in which its queue had a backlog the whole time, so it is the rate the fleet
*can* take that model's jobs, not the rate they happened to arrive; it is averaged with
a time decay (``drain_window``) because claims of long jobs come in lumps. Every time
comes from Redis ``TIME``, so no host's clock matters.

The load is the larger of the occupancy (queued + running over live slots x
``level_jobs_per_slot``) and the worst expected queue wait over ``level_wait_full``.
A level is entered when the load reaches its threshold and left only once the load is
``level_hysteresis`` below it, and no sooner than ``level_hold`` seconds after the load
last reached it, so a load hovering at a threshold does not flap, nor does a level
whose own shedding brings the load down for a moment. The
report (``corral.load.LoadReport``) is written with a TTL: when the scheduler stops or
cannot reach Redis, it expires and gateways fall back to level 0 instead of refusing
work on the word of a dead scheduler.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from corral import keys
from corral.connections import text
from corral.fleet import read_fleet
from corral.load import UNKNOWN_RETRY, LoadReport, ModelLoad
from corral.settings import SchedulerSettings

log = logging.getLogger(__name__)


class LevelComputer:
    """The level from a load figure, with hysteresis (no Redis: pure, for tests)."""

    def __init__(self, thresholds: tuple[float, ...], hysteresis: float, hold: float = 0.0) -> None:
        self.thresholds = thresholds
        self.hysteresis = hysteresis
        self.hold = hold
        self.level = 0
        self._since = -math.inf
        """When (Redis time) the current level was entered or last confirmed."""

    def update(self, load: float, now: float = 0.0) -> int:
        entered = sum(1 for threshold in self.thresholds if load >= threshold)
        if entered >= self.level:
            if entered > self.level or self.level:
                self._since = now
            self.level = entered
            return self.level
        # Shedding lowers the load at once, so without a hold the level would drop, let
        # the shed work back in, and rise again every pass or two.
        if now - self._since < self.hold:
            return self.level
        before = self.level
        while self.level > 0 and load < self.thresholds[self.level - 1] - self.hysteresis:
            self.level -= 1
        if self.level != before:
            self._since = now  # the lower level is entered now, and held in its turn
        return self.level

    def exit_load(self) -> float:
        """The load below which the current level is left (0 at level 0)."""
        if self.level == 0:
            return 0.0
        return max(0.0, self.thresholds[self.level - 1] - self.hysteresis)


class DrainMeter:
    """Per-model drain rates from the consumer group's delivered-entries counter."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._last: dict[str, tuple[float, int, int]] = {}
        """model -> (Redis time, entries delivered so far, jobs queued) at the last pass."""
        self._sums: dict[str, tuple[float, float]] = {}
        """model -> (jobs drained, seconds backlogged), both decayed with time."""

    def update(self, model: str, now: float, delivered: int | None, queued: int) -> float:
        last = self._last.get(model)
        if delivered is None:  # a Redis without the counter (or one just reset): no figure
            self._last.pop(model, None)
            return self.rate(model)
        self._last[model] = (now, delivered, queued)
        if last is None:
            return self.rate(model)
        elapsed, drained = now - last[0], delivered - last[1]
        # Only an interval with a backlog at both ends measures capacity; a counter that
        # went back (a stream deleted and recreated) measures nothing.
        if elapsed > 0 and drained >= 0 and last[2] > 0 and queued > 0:
            decay = math.exp(-elapsed / self.window)
            jobs, seconds = self._sums.get(model, (0.0, 0.0))
            self._sums[model] = (jobs * decay + drained, seconds * decay + elapsed)
        return self.rate(model)

    def rate(self, model: str) -> float:
        jobs, seconds = self._sums.get(model, (0.0, 0.0))
        return jobs / seconds if seconds > 0 else 0.0


@dataclass(slots=True)
class ModelFigures:
    queued: list[int] = field(default_factory=lambda: [0] * len(keys.PRIORITIES))
    running: int = 0
    delivered: int | None = 0


async def measure(redis: Redis, models: list[str]) -> dict[str, ModelFigures]:
    """Queued (per priority), running and delivered-so-far jobs of each model, in one
    pipelined round trip (a stream that does not exist yet answers an error: no jobs)."""
    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.get(keys.queued_count(model))
            for priority in keys.PRIORITIES:
                pipe.xinfo_groups(keys.stream(model, priority))
        replies = iter(await pipe.execute(raise_on_error=False))
    figures: dict[str, ModelFigures] = {}
    for model in models:
        count = next(replies)
        counted = int(count) if isinstance(count, bytes | str | int) else 0
        mine = figures[model] = ModelFigures()
        unknown: list[int] = []
        for priority in keys.PRIORITIES:
            groups = next(replies)
            group = _group(groups)
            if group is None:
                continue
            mine.running += int(group.get("pending") or 0)
            lag, read = group.get("lag"), group.get("entries-read")
            if lag is None:
                unknown.append(priority)
            else:
                mine.queued[priority] = int(lag)
            if read is None or mine.delivered is None:
                mine.delivered = None
            else:
                mine.delivered += int(read)
        if unknown:  # Redis could not count some lags: put the rest of the count there
            mine.queued[unknown[0]] += max(0, counted - sum(mine.queued))
    return figures


def _group(groups: Any) -> dict[str, Any] | None:
    if not isinstance(groups, list):
        return None
    for group in groups:
        if text(group.get("name", b"")) == keys.GROUP:
            return {text(k) if isinstance(k, bytes) else k: v for k, v in group.items()}
    return None


class Levels:
    """Measures, computes and publishes the level; one per scheduler process."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.computer = LevelComputer(
            settings.thresholds(), settings.level_hysteresis, settings.level_hold
        )
        self.meter = DrainMeter(settings.drain_window)
        self.report = LoadReport()
        self.failures = 0

    async def publish(self, redis: Redis, models: list[str]) -> LoadReport | None:
        """Measure and publish; None when Redis refused (the last report then expires on
        its own). A refusal must not fail the pass: the scheduler reads a failed pass as
        lost contact and stops declaring nodes dead for a while, so a Redis refusing
        writes (OOM) would otherwise halt reclaim."""
        try:
            fleet = await read_fleet(redis, self.settings.node_ttl)
            slots = sum(
                int(node.get("slots_total") or 0)
                for node in fleet.nodes
                if node.get("state") == "running"
            )
            report = self.compute(fleet.taken_at, slots, await measure(redis, models))
            await redis.set(keys.LOAD, report.encode(), px=int(self.settings.load_ttl * 1000))
        except RedisError as exc:
            self.failures += 1
            if self.failures == 1:
                log.warning("cannot publish the load report (it expires): %s", exc)
            return None
        if self.failures:
            log.info("load report published again after %d failure(s)", self.failures)
            self.failures = 0
        return report

    def compute(self, now: float, slots: int, figures: dict[str, ModelFigures]) -> LoadReport:
        settings = self.settings
        models: dict[str, ModelLoad] = {}
        queued = running = 0
        wait = 0.0
        for model, mine in figures.items():
            total = sum(mine.queued)
            rate = self.meter.update(model, now, mine.delivered, total)
            queued += total
            running += mine.running
            ahead = tuple(sum(mine.queued[: p + 1]) for p in keys.PRIORITIES)
            models[model] = ModelLoad(rate, ahead)
            if total and rate > 0:
                wait = max(wait, total / rate)
        jobs = queued + running
        full = slots * settings.level_jobs_per_slot
        occupancy = jobs / full if full else (math.inf if jobs else 0.0)
        load = max(occupancy, wait / settings.level_wait_full)
        before = self.computer.level
        level = self.computer.update(load, now) if settings.levels else 0
        rate = sum(m.rate for m in models.values())
        report = LoadReport(
            level=level,
            load=round(min(load, 1e6), 4),
            occupancy=round(min(occupancy, 1e6), 4),
            wait=round(wait, 3),
            slots=slots,
            running=running,
            queued=queued,
            rate=round(rate, 4),
            retry_after=round(self._retry_after(jobs, full, wait, rate), 3) if level else 0.0,
            at=now,
            ttl=settings.load_ttl,
            models=models,
        )
        if level != before:
            log.warning(
                "degradation level %d -> %d (%s): load %.2f; %d queued + %d running over "
                "%d slots (occupancy %.2f), expected queue wait %.1fs, draining %.2f jobs/s",
                before, level, report.name, load, queued, running, slots, occupancy, wait, rate,
            )  # fmt: skip
        self.report = report
        return report

    def _retry_after(self, jobs: int, full: float, wait: float, rate: float) -> float:
        """Seconds until the load should fall out of the current level, at the measured
        drain rate: the jobs above the exit line drained, and the wait shrunk to it."""
        exit_load = self.computer.exit_load()
        if rate <= 0:
            return UNKNOWN_RETRY
        excess_jobs = max(0.0, jobs - exit_load * full)
        excess_wait = max(0.0, wait - exit_load * self.settings.level_wait_full)
        return max(1.0, excess_jobs / rate, excess_wait)
