"""FakeOllama: the fake node's state, counters and knobs, independent of HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, NoReturn

from corral.tooling.fake_ollama_config import (
    GARBAGE_KINDS,
    MIXED,
    FakeOllamaConfig,
    validate_changes,
)
from corral.tooling.fake_ollama_models import (
    ModelMeta,
    describe,
    normalize_name,
    now_rfc3339,
)
from corral.tooling.fake_ollama_scheduler import Lease, QueueFullError, Scheduler
from corral.tooling.fake_ollama_stats import Stats
from corral.tooling.fake_ollama_wire import ApiError, Exchange

QUEUE_FULL_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
INJECTED_FAILURE_MESSAGE = "llama runner process has terminated: injected failure"


class FakeOllama:
    """State of one fake node. Safe to use only from the event loop that serves it."""

    def __init__(self, config: FakeOllamaConfig | None = None) -> None:
        base = config if config is not None else FakeOllamaConfig()
        # Own a copy: runtime changes to this node must not leak into a shared config.
        self.config = dataclasses.replace(
            base,
            models=_unique(normalize_name(name) for name in base.models),
            preloaded=[normalize_name(name) for name in base.preloaded],
        )
        self._changed = asyncio.Event()
        self._catalogue: dict[str, ModelMeta] = {}
        self._rng = random.Random(self.config.seed)
        self._inflight: set[Exchange] = set()
        self._garbage_turns = 0
        self._closed = asyncio.Event()
        self.closing = False
        self.counters = Stats(self.config.models, self._notify)
        self.scheduler = Scheduler(self.config, self.counters)
        self._sync_catalogue()
        self._preload(self.config.preloaded)

    # -- what tests and tools call -------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        snapshot = self.counters.snapshot()
        snapshot["loaded"] = self.scheduler.loaded_summary()
        return snapshot

    def reset(self) -> None:
        """Zero counters and the start log; gauges of in-flight work stay truthful."""
        self.counters.reset()

    def configure(self, **changes: Any) -> None:
        """Change settings at runtime; raises ValueError for unknown or invalid values."""
        valid = validate_changes(changes)
        for name in ("models", "preloaded"):
            if name in valid:
                valid[name] = _unique(normalize_name(model) for model in valid[name])
        models = set(valid.get("models", self.config.models))
        _check_preloaded(valid.get("preloaded", []), models)
        for name, value in valid.items():
            setattr(self.config, name, value)
        if "models" in valid:
            self._sync_catalogue()
        if "seed" in valid:
            self._rng.seed(self.config.seed)
        if "preloaded" in valid:
            self._preload(self.config.preloaded)
        self.scheduler.poke()
        self._notify()

    async def wait_until(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 5.0
    ) -> dict[str, Any]:
        """Wait until `predicate(stats())` holds; re-checked on every change, no polling."""
        try:
            async with asyncio.timeout(within):
                while True:
                    snapshot = self.stats()
                    if predicate(snapshot):
                        return snapshot
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"condition not met within {within}s; stats: {self._brief()}"
            ) from None

    # -- the model catalogue -------------------------------------------------------------

    def catalogue(self) -> list[ModelMeta]:
        return list(self._catalogue.values())

    def find_model(self, name: Any) -> ModelMeta | None:
        if not isinstance(name, str) or not name.strip():
            return None
        return self._catalogue.get(normalize_name(name))

    def add_model(self, name: str) -> ModelMeta:
        model = normalize_name(name)
        if model not in self._catalogue:
            self.config.models.append(model)
            self._sync_catalogue()
        return self._catalogue[model]

    def remove_model(self, model: str) -> None:
        self.config.models = [name for name in self.config.models if name != model]
        self._sync_catalogue()
        self.scheduler.unload(model)

    # -- serving helpers used by the HTTP layer ------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(
        self, model: str, num_ctx: int | None, keep_alive: float | None
    ) -> AsyncIterator[Lease]:
        ctx = num_ctx if num_ctx is not None else self.config.context_length
        try:
            async with self.scheduler.slot(model, ctx, keep_alive) as lease:
                yield lease
        except QueueFullError:
            raise ApiError(503, QUEUE_FULL_MESSAGE) from None

    @contextlib.contextmanager
    def generating(
        self,
        endpoint: str,
        model: str,
        prompt: str,
        ex: Exchange | None = None,
        *,
        continued: bool = False,
    ) -> Iterator[str]:
        """Count one generation as active for its duration and log its start.

        Yields the request's fingerprint in the run registry; with ``ex``, the run counts
        as completed when the answer's last bytes go out.
        """
        self.counters.change_active(model, +1)
        self.counters.log_start(endpoint, model, prompt)
        run = self.counters.run_started(model, prompt, continued=continued)
        if ex is not None:
            previous = ex.on_complete

            def completed() -> None:
                if previous is not None:
                    previous()
                self.counters.run_ended(run, "continued" if continued else "completed")

            ex.on_complete = completed
        try:
            yield run
        finally:
            self.counters.change_active(model, -1)

    def garbage_for(self, prompt: str) -> str | None:
        """The kind of garbage to answer this prompt with, or None for a proper answer."""
        cfg = self.config
        marked = bool(cfg.garbage_marker) and cfg.garbage_marker in prompt
        if not marked and not (cfg.garbage_rate > 0 and self._rng.random() < cfg.garbage_rate):
            return None
        if cfg.garbage_kind != MIXED:
            return cfg.garbage_kind
        kind = GARBAGE_KINDS[self._garbage_turns % len(GARBAGE_KINDS)]
        self._garbage_turns += 1
        return kind

    async def inject_failure(self) -> None:
        """Apply `hang`, `fail_next` and `fail_rate` to a request about to be served."""
        if self.config.hang:
            await _forever()
        if self._take_failure():
            status = self.config.fail_status
            message = QUEUE_FULL_MESSAGE if status == 503 else INJECTED_FAILURE_MESSAGE
            raise ApiError(status, message)

    def track(self, exchange: Exchange) -> None:
        self._inflight.add(exchange)

    def untrack(self, exchange: Exchange) -> None:
        self._inflight.discard(exchange)

    def abort_inflight(self) -> None:
        """Stop serving: kill every open model request as a node going down would."""
        self.closing = True
        self._closed.set()
        for exchange in list(self._inflight):
            exchange.abort()

    async def hold(self, seconds: float) -> None:
        """Take ``seconds`` to answer (a slow node), unless the node shuts down first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closed.wait()

    def expires_at_ns(self, monotonic_deadline: float | None) -> int | None:
        if monotonic_deadline is None:
            return None
        return time.time_ns() + int((monotonic_deadline - time.monotonic()) * 1e9)

    # -- internals -------------------------------------------------------------------------

    def _take_failure(self) -> bool:
        if self.config.fail_next > 0:
            self.config.fail_next -= 1
            return True
        return self.config.fail_rate > 0 and self._rng.random() < self.config.fail_rate

    def _sync_catalogue(self) -> None:
        stamp = now_rfc3339()
        previous = self._catalogue
        self._catalogue = {
            name: previous.get(name) or describe(name, stamp) for name in self.config.models
        }
        for name in self._catalogue:
            self.counters.ensure_model(name)

    def _preload(self, models: list[str]) -> None:
        _check_preloaded(models, set(self._catalogue))
        for name in models:
            self.scheduler.preload(name)

    def _notify(self) -> None:
        # Wake every waiter, then give later waiters a fresh event to sleep on.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _brief(self) -> dict[str, Any]:
        snapshot = self.stats()
        snapshot.pop("started")
        return snapshot


def _check_preloaded(preloaded: Iterable[str], models: set[str]) -> None:
    unknown = [name for name in preloaded if name not in models]
    if unknown:
        raise ValueError(f"preloaded model(s) not in models: {', '.join(unknown)}")


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


async def _forever() -> NoReturn:
    # Never resolves: the request ends only when its client goes away or the server stops.
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")
