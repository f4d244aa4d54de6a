"""The worker engine: claim when a slot is free, run against Ollama, answer, heartbeat.

Slots are a semaphore of ``OLLAMA_NUM_PARALLEL`` permits. The claim loop takes a permit
*before* it claims, so the node never holds more claimed jobs than free slots; with a
permit in hand it claims (non-blocking Lua, most urgent priority first) and, if nothing
waits, blocks on the doorbells of its models. Shutdown is two-phase: stop claiming and
let running jobs finish for ``drain_timeout``, then hand the rest back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from corral import fleet, keys, loops, protocol
from corral.connections import TRANSIENT_REDIS_ERRORS, server_time, text
from corral.errors import BackendError, RedisUnavailable
from corral.jobs import ORPHANED, ClaimedJob, JobStore
from corral.keys import JobKind, JobState
from corral.loops import LoopHealth
from corral.names import normalize_model
from corral.settings import WorkerSettings
from corral.streams import existing_streams
from corral.subscription import Subscription
from corral.tasks import cancel_and_wait
from corral.telemetry import Recorder
from corral.worker.aggregate import Aggregator
from corral.worker.breaker import Breaker, BreakerState
from corral.worker.embed_batch import EchoedError, EmbedBatcher
from corral.worker.metrics import HostMetrics, host_addresses
from corral.worker.ollama import OllamaClient
from corral.worker.placement import Placement
from corral.worker.resume import (
    CannotContinue,
    Partial,
    as_generate_chunk,
    continuation,
    read_partial,
    summed_final,
)

log = logging.getLogger(__name__)

TELEMETRY_INTERVAL = 1.0
"""Seconds between writes of this worker's queue waits and token counts to Redis."""

STRANDED_AFTER = 5.0
"""Seconds a pending entry of this node must have been idle before it counts as stranded."""

FAIRNESS_EVERY = 8
"""Every Nth claim looks at models that are not loaded first, so they cannot starve."""

CLAIM_BATCH = 16
"""Most jobs one claim call takes (bounded so one Lua call stays short)."""

REDIS_WRITE_ERRORS = (RedisError, OSError, RuntimeError)
"""What a bookkeeping write may raise and be tried again after: a dropped connection, a
timeout, and error replies too (``OOM`` while Redis refuses writes at ``maxmemory``)."""

LOADED_NS = 100_000_000
"""A ``load_duration`` above this (ns) means the job paid a model load."""

MIN_TOKENS = 8
"""Answers shorter than this say little about a node's speed and are not measured."""

TAIL_POLL = 0.1
"""Seconds between looks at a model's queue while faster nodes are left its short backlog."""

MODELS_TIMEOUT = 30.0
"""Seconds model discovery (``/api/tags``, ``/api/version``) may take before it is retried."""


@dataclass(slots=True)
class Progress:
    """How far a job's answer got to its client."""

    sent: int = 0
    resumed: bool = False
    """Whether this attempt continues an answer another attempt began."""


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        redis: Redis,
        bell: Redis,
        pubsub: Redis,
        ollama: OllamaClient,
        metrics: HostMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.resolved_node_id()
        self.slots_total = settings.resolved_slots()
        self.redis = redis
        self.bell = bell
        self.pubsub = pubsub
        self.ollama = ollama
        self.metrics = metrics
        offset = settings.clock_offset
        self.clock: Callable[[], float] = (lambda: time.time() + offset) if offset else time.time
        """This worker's own clock: log lines and history only. Liveness, deadlines and
        orphans are judged on Redis's clock (CORRAL_CLOCK_OFFSET skews this one in tests)."""
        self.store = JobStore(
            redis,
            job_ttl=settings.job_ttl,
            result_ttl=settings.result_ttl,
            gateway_ttl=settings.gateway_ttl,
            clock=self.clock,
            resume_streams=settings.resume_streams,
        )
        self.health = LoopHealth()
        """Each background loop's last success, shown in the heartbeat."""
        self.ready = asyncio.Event()
        """Set once models are discovered and the first heartbeat is out."""
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(self.slots_total)
        self._running: dict[str, tuple[asyncio.Task[None], ClaimedJob]] = {}
        self._cancel_requested: set[str] = set()
        self._tags: list[dict[str, Any]] = []
        self._loaded: list[dict[str, Any]] = []
        self._models_changed = asyncio.Event()
        self._ollama_ok = False
        self._draining = False
        self._claims = 0
        self._started_at = self.clock()
        self._version = ""
        self.stranded_after = STRANDED_AFTER
        self._backoff = loops.Backoff(base=0.2, cap=2.0)
        self.recorder = Recorder()
        """Queue waits and generation speed, flushed to Redis by the telemetry loop."""
        self.breaker = Breaker(
            threshold=settings.breaker_failures,
            window=settings.breaker_window,
            cooldown=settings.breaker_cooldown,
        )
        self._breaker_changed = asyncio.Event()
        self.placement = Placement(
            self.node_id,
            weight=settings.weight,
            backup=settings.backup,
            weight_step=settings.weight_step,
            spill_after=settings.spill_after,
            locality_wait=settings.locality_wait,
            load_cost=settings.load_cost,
        )
        self.embedder = EmbedBatcher(self.ollama.post, window=settings.embed_batch_window)
        self._tail_watch: dict[str, tuple[int, float]] = {}
        """Per model, the queue length last seen while leaving it to faster nodes, and
        since when it has not changed."""
        self._most_loaded = 0
        """The most models ``/api/ps`` has shown loaded at once: above one, Ollama holds
        several (``OLLAMA_MAX_LOADED_MODELS``) and a load need not evict the others."""
        self._after_load_task: asyncio.Task[None] | None = None
        """Reads ``/api/ps`` and heartbeats after a load (see ``_measure``)."""
        self._peers: list[fleet.NodeRecord] = []
        """The live nodes' heartbeats, as last read (placement defers to better ones)."""
        self._forced = {
            normalize_model(model): options for model, options in settings.forced_options().items()
        }

    # -- lifecycle -------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def models(self) -> list[str]:
        return [str(m["name"]) for m in self._tags]

    @property
    def busy(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        await self._persist(self.refresh_models, "discovering models")
        await self._persist(self.heartbeat, "first heartbeat")
        beat = self.settings.heartbeat_interval
        # Each loop on its own, so nothing slow (Ollama loading a model, a stalled Redis
        # call) delays a heartbeat: a node that misses its TTL is declared dead.
        periodic = [
            ("heartbeat", beat, self.heartbeat, self.settings.node_ttl),
            ("loaded-models", beat, self.refresh_loaded, None),
            ("models", self.settings.models_refresh, self.refresh_models, None),
            ("upkeep", beat, self.upkeep, None),
            ("telemetry", TELEMETRY_INTERVAL, self.flush_telemetry, None),
            ("peers", beat, self.refresh_peers, None),
        ]
        background = [
            asyncio.create_task(
                loops.every(name, every, action, self.health, stale_after=stale), name=name
            )
            for name, every, action, stale in periodic
        ]
        background.append(asyncio.create_task(self._cancel_listener(), name="cancel-listener"))
        claim = asyncio.create_task(self._claim_loop(), name="claim-loop")
        watcher = asyncio.create_task(loops.watch(background), name="watch")
        self.ready.set()
        log.info(
            "worker %s serving %s with %d slot(s) from %s",
            self.node_id,
            self.models,
            self.slots_total,
            self.settings.ollama_url,
        )
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([stop, claim, watcher], return_when=asyncio.FIRST_COMPLETED)
            for task in (watcher, claim):
                if task.done() and not task.cancelled() and task.exception():
                    # A loop or the claim loop ended: stop (non-zero exit) so systemd
                    # restarts a whole worker instead of leaving half of one running.
                    raise task.exception()  # type: ignore[misc]
        finally:
            stop.cancel()
            watcher.cancel()
            await self._shutdown(claim, background)

    async def _shutdown(
        self, claim: asyncio.Task[None], background: list[asyncio.Task[None]]
    ) -> None:
        self._draining = True
        await cancel_and_wait(claim)
        log.info("worker %s draining %d running job(s)", self.node_id, self.busy)
        with contextlib.suppress(*REDIS_WRITE_ERRORS):
            await self.heartbeat()
        running = [task for task, _ in self._running.values()]
        if running and self.settings.drain_timeout > 0:
            await asyncio.wait(running, timeout=self.settings.drain_timeout)
        leftover = [task for task, _ in self._running.values()]
        if leftover:
            log.warning("worker %s handing back %d job(s)", self.node_id, len(leftover))
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.wait(leftover)
        for task in background:
            await cancel_and_wait(task)
        if self._after_load_task is not None:
            await cancel_and_wait(self._after_load_task)
        with contextlib.suppress(*REDIS_WRITE_ERRORS):
            await self.flush_telemetry()
        try:
            held = await self.pending_entries()
            if held:
                # Leaving the registry now would hide these entries' owner: stay in it
                # until the record expires, and the scheduler takes them back then.
                log.error(
                    "worker %s still holds %d claimed job(s) it could not hand back; "
                    "leaving it registered so the scheduler takes them back",
                    self.node_id,
                    held,
                )
            else:
                await fleet.remove_node(self.redis, self.node_id)
        except REDIS_WRITE_ERRORS as exc:
            log.warning("worker %s could not leave the registry: %s", self.node_id, exc)
        log.info("worker %s stopped", self.node_id)

    async def pending_entries(self) -> int:
        """How many stream entries are pending under this node's name (up to 100 a stream)."""
        return sum(len(entries) for _, entries in await self._own_pending())

    async def _own_pending(
        self, *, idle: float = 0.0
    ) -> list[tuple[tuple[str, int], list[dict[str, Any]]]]:
        """Per existing stream of this node's models, the entries pending under its name
        (at most 100 each) that have been idle ``idle`` seconds or more."""
        streams = await existing_streams(self.redis, self.models)
        if not streams:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for model, priority in streams:
                pipe.xpending_range(
                    keys.stream(model, priority), keys.GROUP, min="-", max="+", count=100,
                    consumername=self.node_id, idle=int(idle * 1000) or None,
                )  # fmt: skip
            found = await pipe.execute(raise_on_error=False)
        # An error in place of a list: the stream went away meanwhile.
        return [
            (stream, entries)
            for stream, entries in zip(streams, found, strict=True)
            if isinstance(entries, list)
        ]

    # -- discovery and heartbeat -----------------------------------------------------

    async def _ask(self, path: str, within: float) -> Any:
        """GET an Ollama endpoint within ``within`` seconds (a slow one is a failed one)."""
        try:
            async with asyncio.timeout(within):
                return await self.ollama.get_json(path)
        except TimeoutError as exc:
            message = f"Ollama's {path} took over {within:g}s"
            raise BackendError(message, 504, retriable=True) from exc

    async def refresh_models(self) -> None:
        try:
            tags = await self._ask("/api/tags", MODELS_TIMEOUT)
            version = await self._ask("/api/version", MODELS_TIMEOUT)
            self._version = str(version.get("version", "")) if isinstance(version, dict) else ""
            if not isinstance(tags, dict):
                raise BackendError("Ollama's /api/tags is not a JSON object", 502, retriable=True)
        except BackendError as exc:
            if self._ollama_ok:
                log.error("Ollama at %s unavailable: %s", self.settings.ollama_url, exc.message)
            self._ollama_ok = False
            return
        wanted = {normalize_model(m) for m in self.settings.model_filter()}
        entries = [
            {**m, "name": normalize_model(str(m.get("name") or m.get("model")))}
            for m in tags.get("models", [])
        ]
        entries = [m for m in entries if not wanted or m["name"] in wanted]
        new = {m["name"] for m in entries} - set(self.models)
        self._tags = entries
        if not self._ollama_ok:
            await self.refresh_loaded()
        self._ollama_ok = True
        if new:
            log.info("worker %s now serves %s", self.node_id, sorted(new))
            self._models_changed.set()
            await self._publish_model_info(sorted(new))

    async def _publish_model_info(self, models: list[str]) -> None:
        """Cache ``/api/show`` per model so the gateway can answer it without a slot."""
        for model in models:
            try:
                info = await self.ollama.post("/api/show", orjson.dumps({"model": model}))
            except BackendError as exc:
                log.warning("show %s failed: %s", model, exc.message)
                continue
            ttl = int(max(self.settings.models_refresh * 6, 60))
            await self.redis.set(keys.model_info(model), info, ex=ttl)

    async def refresh_loaded(self) -> None:
        """Which models Ollama has loaded (``/api/ps``), within ``ps_timeout``.

        Ollama can take many seconds to answer while it loads a large model; the heartbeat
        never waits for this, and keeps showing the last answer meanwhile.
        """
        try:
            ps = await self._ask("/api/ps", self.settings.ps_timeout)
        except BackendError as exc:
            log.debug("keeping the last /api/ps answer: %s", exc.message)
            return
        if isinstance(ps, dict):
            self._loaded = list(ps.get("models") or [])
            self._most_loaded = max(self._most_loaded, len(self._loaded))

    async def heartbeat(self) -> None:
        """Publish this node's record. Waits on Redis alone: never on Ollama, and host
        metrics are read off the event loop (NVML can block)."""
        host = await asyncio.to_thread(self.metrics.read) if self.metrics else {}
        await fleet.publish_heartbeat(self.redis, self.record(host), self.settings.node_ttl)

    async def refresh_peers(self) -> None:
        """Read the other nodes' heartbeats, for placement."""
        self._peers = (await fleet.read_fleet(self.redis, self.settings.node_ttl)).nodes

    async def upkeep(self) -> None:
        """Catch lost cancellations and stranded entries; keep cached model info alive."""
        await self._reconcile_cancels()
        await self.reclaim_stranded()
        if self._tags:  # keep the cached /api/show answers alive while we serve the model
            async with self.redis.pipeline(transaction=False) as pipe:
                for model in self.models:
                    pipe.expire(
                        keys.model_info(model), int(max(self.settings.models_refresh * 6, 60))
                    )
                await pipe.execute()

    def record(self, host: dict[str, Any] | None = None) -> fleet.NodeRecord:
        breaker = self.breaker.state
        if self._draining:
            state = "draining"
        elif not self._ollama_ok:
            state = "ollama-down"
        elif breaker is not BreakerState.CLOSED:
            state = f"breaker-{breaker.value}"  # never "running": not a healthy node
        else:
            state = "running"
        return {
            "node_id": self.node_id,
            "hosts": host_addresses(),
            "ollama_url": self.settings.ollama_url,
            "version": self._version,
            "state": state,
            "models": self._tags,
            "loaded": self._loaded,
            "slots_total": self.slots_total,
            "slots_busy": self.busy,
            "running": list(self._running),
            "started_at": self._started_at,
            "loops": self.health.report(),
            "breaker": self.breaker.report(),
            "weight": self.settings.weight,
            "backup": self.settings.backup,
            "load_costs": {m: round(s, 3) for m, s in self.placement.load_costs.items()},
            "speeds": {m: round(s, 2) for m, s in self.placement.speeds.items()},
            "durations": {m: round(s, 3) for m, s in self.placement.durations.items()},
            **(host or {}),
        }

    async def _reconcile_cancels(self) -> None:
        """Catch cancellations whose pub/sub notice was lost (pub/sub is at-most-once), and
        orphans: jobs whose client waited on a gateway that has since died."""
        if not self._running:
            return
        ids = list(self._running)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(keys.job(job_id), "state", "wait", "gw", "node")
            records = await pipe.execute()
        gateways = {gw for _, wait, gw, _ in records if wait == b"1" and gw}
        live = await self._live_gateways(gateways)
        me = self.node_id.encode()
        for job_id, (state, wait, gw, node) in zip(ids, records, strict=True):
            if state != b"running" or node != me:
                # Cancelled, expired, or taken back from this node (declared dead while it
                # was stopped, say): another node may be running it now, so stop ours.
                self._cancel(job_id)
            elif wait == b"1" and gw not in live:
                await self.store.cancel(job_id, ORPHANED, status=503)
                self._cancel(job_id)

    async def _live_gateways(self, gateways: set[bytes]) -> set[bytes]:
        if not gateways:
            return set()
        names = sorted(gateways)
        scores = await self.redis.zmscore(keys.GATEWAYS, [n.decode() for n in names])
        cutoff = await server_time(self.redis) - self.settings.gateway_ttl
        return {name for name, seen in zip(names, scores, strict=True) if seen and seen >= cutoff}

    # -- cancellation ----------------------------------------------------------------

    async def _cancel_listener(self) -> None:
        """Abort running jobs whose clients cancelled them, as the notices arrive.

        The subscription pings Redis and replaces a connection that fell silent; after
        each re-subscription the running jobs are checked against their records, so a
        cancellation published while we were not listening aborts its job at once rather
        than at the next heartbeat.
        """
        subscription = Subscription(
            self.pubsub,
            keys.cancel_channel(self.node_id),
            lambda data: self._cancel(text(data)),
            self.health,
            name="cancel-subscription",
            on_resubscribed=self._reconcile_cancels,
        )
        await subscription.run()

    def _cancel(self, job_id: str) -> None:
        entry = self._running.get(job_id)
        if entry is None or job_id in self._cancel_requested:
            return
        self._cancel_requested.add(job_id)
        log.info("job %s is no longer this node's to run; aborting the Ollama request", job_id)
        entry[0].cancel()

    # -- claiming --------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        drained = False
        while True:
            await self._slots.acquire()
            held = 1
            try:
                # Every slot free right now goes into one claim: a busy node then pays one
                # round trip per batch of jobs instead of one per job.
                while held < CLAIM_BATCH and not self._slots.locked():
                    await self._slots.acquire()  # free: returns at once
                    held += 1
                if drained:
                    # The last claim emptied every queue (and cleared the doorbells), so
                    # a claim now would find nothing: wait for the next ring instead.
                    with contextlib.suppress(*REDIS_WRITE_ERRORS):  # then claim retries
                        await self._wait_for_work(self._claim_order())
                jobs, drained = await self._next_jobs(held)
            except BaseException:
                for _ in range(held):
                    self._slots.release()
                raise
            for job in jobs:
                self._start(job)
            for _ in range(held - len(jobs)):
                self._slots.release()
            await asyncio.sleep(0)  # let the new jobs send their requests before we claim on

    async def _next_jobs(self, limit: int) -> tuple[list[ClaimedJob], bool]:
        """Up to ``limit`` claimed jobs, at least one: waits on the doorbells for work.

        The flag says whether the claim found every queue of this node empty.
        """
        failures = 0
        while True:
            allowed = self.breaker.allowance(limit)
            if not allowed:
                await self._wait_for_breaker()
                continue
            order = self._claim_order()
            jobs: list[ClaimedJob] = []
            defer: float | None = None
            try:
                for model in order:
                    if await self._leave_to_faster(model):
                        defer = TAIL_POLL if defer is None else min(defer, TAIL_POLL)
                        continue
                    got, later = await self.store.claim_aged(
                        model, self.node_id, allowed - len(jobs), await self._claim_delay(model)
                    )
                    jobs += got  # ours from here on, whatever fails next
                    if got and model not in self._loaded_names():
                        await self._announce_load(model)
                    if later is not None:
                        defer = later if defer is None else min(defer, later)
                    if len(jobs) == allowed:
                        break
                if jobs:
                    self._claims += 1
                    for job in jobs:
                        self.breaker.claimed(job.job_id)
                    return jobs, len(jobs) < limit and defer is None
                if defer is not None:
                    # Jobs wait that better placed nodes should take first: look again
                    # when the first of them has waited out this node's delay.
                    await asyncio.sleep(min(defer, self.settings.bell_timeout))
                    continue
                await self._wait_for_work(order)
            except Exception as exc:  # any failure: back off and claim again, never die
                if jobs:  # claimed before the failure: run those, they are ours
                    self._claims += 1
                    return jobs, False
                failures += 1
                log.warning("claiming failed (%d in a row), retrying: %r", failures, exc)
                await asyncio.sleep(self._backoff.delay(failures))  # back off from an outage

    async def _claim_delay(self, model: str) -> float:
        """Seconds a job of ``model`` must have waited before this node claims it."""
        loaded = model in self._loaded_names()
        queued = 0
        loader: str | None = None
        # Both figures only matter while another node could take the job or load the model
        # instead (``Placement.delay`` waits for nobody else): a node alone reads nothing.
        if not loaded and self.placement.locality_wait > 0 and self._served_elsewhere(model):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(keys.queued_count(model))
                pipe.get(keys.loading(model))
                count, who = await pipe.execute()
            queued = int(count or 0)
            loader = who.decode() if isinstance(who, bytes) else who
        delay = self.placement.delay(
            model,
            loaded_here=loaded,
            peers=self._peers,
            queued=queued,
            holding=self._loaded_names(),
            loader=loader,
        )
        if self.breaker.recent_failures() and self._served_elsewhere(model):
            # Failing lately: let healthy nodes take jobs first, so one job is not failed
            # here attempt after attempt before the breaker opens.
            delay = max(delay, self.settings.spill_after)
        return delay

    async def _announce_load(self, model: str) -> None:
        """Tell the other nodes this one is loading ``model`` (so they do not load it too),
        and count it as loaded here until ``/api/ps`` is read after the load; on a node
        that holds one model at a time, as the only one: the load evicts the other, and
        a node that took its jobs as warm meanwhile would switch back and forth."""
        if self.placement.locality_wait <= 0:
            return  # locality off: claims follow the last /api/ps answer, as before it
        loading = {"name": model, "model": model}
        # A node seen holding one model at a time likely evicts it; one seen holding
        # several keeps them, as far as it knows, until /api/ps says otherwise.
        self._loaded = [*self._loaded, loading] if self._most_loaded > 1 else [loading]
        cost = self.placement.load_costs.get(model, self.placement.load_cost)
        hold = cost + 2 * self.settings.heartbeat_interval
        with contextlib.suppress(*REDIS_WRITE_ERRORS):  # a hint: losing it costs a load
            await self.redis.set(keys.loading(model), self.node_id, px=int(hold * 1000))

    async def _after_load(self) -> None:
        with contextlib.suppress(*REDIS_WRITE_ERRORS):
            await self.refresh_loaded()
            await self.heartbeat()

    async def _leave_to_faster(self, model: str) -> bool:
        """Whether faster nodes should take the whole short backlog of ``model``."""
        if not self.settings.tail_aware:
            return False
        threshold = self.placement.tail_threshold(model, self._peers)
        if threshold <= 0:
            return False
        queued = int(await self.redis.get(keys.queued_count(model)) or 0)
        if queued > threshold or queued == 0:
            self._tail_watch.pop(model, None)
            return False
        # Safety valve: faster nodes that take none of the backlog for a while (hung, or
        # busy with long jobs) are not waited for.
        now = time.monotonic()
        seen, since = self._tail_watch.get(model, (queued, now))
        if queued != seen:
            since = now
        self._tail_watch[model] = (queued, since)
        return now - since < self.placement.tail_patience(model, self._peers)

    def _served_elsewhere(self, model: str) -> bool:
        return any(
            peer.get("node_id") != self.node_id
            and peer.get("state") == "running"
            and any(
                normalize_model(str(m.get("name") or m.get("model"))) == model
                for m in peer.get("models") or ()
            )
            for peer in self._peers
        )

    def _loaded_names(self) -> set[str]:
        return {normalize_model(str(m.get("name") or m.get("model"))) for m in self._loaded}

    async def _wait_for_breaker(self) -> None:
        """Wait while the breaker allows no claim: until it may go half-open, or its probe
        ends (then the state changed)."""
        self._breaker_changed.clear()
        wait = self.breaker.reopens_in() or self.settings.bell_timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._breaker_changed.wait(), wait)

    def _claim_order(self) -> list[str]:
        if not self._ollama_ok:
            return []
        loaded = self._loaded_names()
        hot = [m for m in self.models if m in loaded]
        cold = [m for m in self.models if m not in loaded]
        if self._claims % FAIRNESS_EVERY == FAIRNESS_EVERY - 1:
            return cold + hot
        return hot + cold

    async def _wait_for_work(self, models: list[str]) -> None:
        if not models:
            self._models_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._models_changed.wait(), self.settings.bell_timeout)
            return
        await self.bell.blpop(
            [keys.doorbell(m) for m in models], timeout=self.settings.bell_timeout
        )

    async def flush_telemetry(self) -> None:
        await self.recorder.flush(self.redis)

    def _start(self, job: ClaimedJob) -> None:
        self.recorder.observe("wait", (job.model, str(job.priority)), job.waited)
        task = asyncio.create_task(self._run(job), name=f"job-{job.job_id}")
        self._running[job.job_id] = (task, job)
        task.add_done_callback(lambda t: self._finished(job.job_id, t))

    def _finished(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._cancel_requested.discard(job_id)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s crashed the runner", job_id, exc_info=task.exception())

    # -- running ---------------------------------------------------------------------

    async def _run(self, job: ClaimedJob) -> None:
        started = time.monotonic()
        log.info(
            "job %s running: %s %s p%d attempt %d",
            job.job_id,
            job.kind.value,
            job.model,
            job.priority,
            job.attempt,
        )
        progress = Progress()
        limit = asyncio.timeout(job.run_timeout or None)
        healthy: bool | None = None  # the breaker's verdict on this node, if any
        try:
            async with limit:
                if job.kind.streams:
                    result, final = await self._stream(job, progress)
                elif job.kind is JobKind.EMBED and self.settings.embed_batching:
                    result = final = await self.embedder.embed(self._request(job))
                else:
                    result = final = await self.ollama.post(job.kind.path, self._request(job))
            healthy = True
            if not progress.resumed:  # a continuation's counts include the first attempt's
                self._measure(job.model, result, time.monotonic() - started)
            message = protocol.encode(job.job_id, progress.sent, protocol.DONE, final)
            await self._settle(job, JobState.DONE, result=result, message=message)
            log.info("job %s done in %.3fs", job.job_id, time.monotonic() - started)
        except BackendError as exc:
            # A 4xx is Ollama answering properly about a bad request: the node is fine.
            # A batch's failure is the node's once, not once per job in the batch; an
            # answer no node can continue is no node's failure.
            healthy = None if isinstance(exc, EchoedError | CannotContinue) else exc.status < 500
            await self._failed(job, exc, progress.sent)
        except TimeoutError as exc:
            if limit.expired():
                # Leaving the timeout block closed the Ollama request, so the node stopped
                # generating. Not retried: another attempt would most likely run as long.
                reason = (
                    f"job ran longer than its run timeout of {job.run_timeout:g}s "
                    f"and was aborted on node {self.node_id}"
                )
                await self._failed(job, BackendError(reason, 504, retriable=False), progress.sent)
            else:
                await self._failed(job, self._unexpected(job, exc), progress.sent)
        except TRANSIENT_REDIS_ERRORS as exc:
            # Redis went away mid-job (even after the client's retries): never leave the
            # job running with no runner; settle or hand it back once Redis answers.
            log.warning("job %s lost Redis mid-run (%s); handing it back", job.job_id, exc)
            await self._hand_back(job, progress.sent, f"node {self.node_id} lost Redis")
        except Exception as exc:
            await self._failed(job, self._unexpected(job, exc), progress.sent)
        except asyncio.CancelledError:
            if job.job_id in self._cancel_requested:
                await asyncio.shield(self._settle(job, JobState.CANCELLED))
            else:
                await asyncio.shield(self._hand_back(job, progress.sent))
            raise
        finally:
            self._judge(job.job_id, healthy)

    def _judge(self, job_id: str, healthy: bool | None) -> None:
        """Tell the breaker how the node did on a job (None: no verdict)."""
        before = self.breaker.state
        if healthy is None:
            self.breaker.released(job_id)
        elif healthy:
            self.breaker.succeeded(job_id)
        else:
            self.breaker.failed(job_id)
        self._breaker_changed.set()
        after = self.breaker.state
        if after is not before:
            log.warning("node %s circuit breaker %s -> %s", self.node_id, before, after)

    def _request(self, job: ClaimedJob) -> bytes:
        """The request as sent to Ollama: with this model's forced runner options, if any,
        so requests that differ only there do not make Ollama reload the model."""
        forced = self._forced.get(job.model)
        if not forced:
            return job.request
        body = orjson.loads(job.request)
        if not isinstance(body, dict):
            return job.request
        options = body.get("options")
        body["options"] = {**(options if isinstance(options, dict) else {}), **forced}
        return orjson.dumps(body)

    def _measure(self, model: str, result: bytes, took: float) -> None:
        """Learn this node's load cost for ``model`` from a final answer's load_duration
        (nanoseconds; a load shows as more than a tenth of a second, a warm model less)."""
        try:
            final = orjson.loads(result)
        except orjson.JSONDecodeError:
            return
        if not isinstance(final, dict):
            return
        load = final.get("load_duration")
        load_s = load / 1e9 if isinstance(load, int | float) and load > LOADED_NS else 0.0
        if load_s:
            self.placement.note_load(model, load_s)
        # The load may have evicted another model: learn which now, not at the next
        # refresh, so the next claims do not take that model's jobs as warm here.
        if (
            load_s
            and self.placement.locality_wait > 0
            and (self._after_load_task is None or self._after_load_task.done())
        ):
            self._after_load_task = asyncio.create_task(self._after_load(), name="after-load")
        self.placement.note_duration(model, took - load_s)
        tokens, spent = final.get("eval_count"), final.get("eval_duration")
        if isinstance(tokens, int) and isinstance(spent, int | float) and tokens >= MIN_TOKENS:
            self.placement.note_speed(model, tokens, spent / 1e9)

    def _unexpected(self, job: ClaimedJob, exc: BaseException) -> BackendError:
        """Anything but a backend error (a Redis error reply, a bug): the job must not stay
        running with no runner, so it is a failed attempt, counted, retried while attempts
        last."""
        log.error("job %s failed unexpectedly on node %s", job.job_id, self.node_id, exc_info=exc)
        reason = f"node {self.node_id} failed while running the job: {exc!r}"
        return BackendError(reason, 500, retriable=True)

    async def _failed(self, job: ClaimedJob, exc: BackendError, sent: int) -> None:
        """Retry what another attempt may fix; if the client already has part of it, only
        when the next attempt continues the answer (``resume_streams``)."""
        if exc.retriable and (not sent or self.settings.resume_streams):
            done = False

            async def retry() -> None:
                nonlocal done
                done = await self.store.retry(job, self.node_id, exc.message, exc.status)

            await self._persist(retry, f"handing job {job.job_id} to its retry")
            if done:
                log.warning(
                    "job %s attempt %d failed, to be retried: %s",
                    job.job_id,
                    job.attempt,
                    exc.message,
                )
            return
        message = protocol.encode_error(job.job_id, sent, exc.message, exc.status)
        await self._settle(
            job, JobState.FAILED, error=exc.message, status=exc.status, message=message
        )
        log.warning("job %s failed (%d): %s", job.job_id, exc.status, exc.message)

    async def _stream(self, job: ClaimedJob, progress: Progress) -> tuple[bytes, bytes]:
        """Forward chunks as they come; returns (full result, final message).

        ``progress.sent`` counts chunks already sent, and stays right when this raises:
        whether the job may be re-run depends on it.
        """
        aggregate = Aggregator(job.kind)
        channel = keys.reply_channel(job.gateway_id)
        path, request, as_generate = job.kind.path, self._request(job), False
        partial = await self._partial(job)
        if partial is not None:
            # Another node streamed part of this answer and died: continue it from where
            # the client is, numbering the new chunks after the ones it has.
            for chunk in partial.chunks:
                aggregate.add(chunk)
            progress.sent, progress.resumed = partial.sent, True
            ask = continuation(job.kind, request, partial)
            path, request, as_generate = ask.path, ask.request, ask.as_generate
            log.info("job %s continues its answer after %d chunk(s)", job.job_id, partial.sent)
        last = b""
        async for received in self.ollama.stream_lines(path, request):
            line = received
            chunk = _parse_chunk(line)
            if "error" in chunk:  # Ollama reports mid-stream failures as an error line
                raise BackendError(str(chunk["error"]), 500, retriable=False)
            if partial is not None:
                if as_generate:
                    chunk = as_generate_chunk(chunk)
                if chunk.get("done"):
                    chunk = summed_final(chunk, partial)
                line = orjson.dumps(chunk)
            aggregate.add(chunk)
            if aggregate.done:
                # No break: reading to the end of the body keeps the connection for the
                # next job; leaving early closes it, and the next job pays a new connect.
                last = line
                continue
            if job.stream:
                await self._forward(
                    job,
                    channel,
                    protocol.encode(job.job_id, progress.sent, protocol.CHUNK, line),
                    seq=progress.sent,
                )
                progress.sent += 1
        if not aggregate.done:
            raise BackendError("Ollama ended the stream before it was done", 502, retriable=True)
        self._record_speed(job, aggregate.final or {}, partial.sent if partial else 0)
        result = orjson.dumps(aggregate.result())
        return result, last if job.stream else result

    def _record_speed(self, job: ClaimedJob, final: dict[str, Any], earlier: int = 0) -> None:
        """Tokens this node generated and their rate, from Ollama's own counts in the last
        chunk; ``earlier``: tokens of a continued answer that another node generated (its
        final counts include them, and its duration is scaled to them)."""
        tokens, nanos = final.get("eval_count"), final.get("eval_duration")
        if not isinstance(tokens, int) or tokens <= 0:
            return
        if earlier and isinstance(nanos, int | float):
            nanos = nanos * (tokens - earlier) / tokens
            tokens -= earlier
            if tokens <= 0:
                return
        labels = (self.node_id, job.model)
        self.recorder.count("tok", labels, tokens)
        if isinstance(nanos, int | float) and nanos > 0:
            self.recorder.observe(
                "corral_generation_tokens_per_second", labels, tokens / (nanos / 1e9)
            )

    async def _partial(self, job: ClaimedJob) -> Partial | None:
        """The chunks an earlier attempt already streamed to the client, if any.

        A replay list cut at ``replay_max_messages`` no longer says where the client is:
        a continuation from the end of the list would be spliced onto text the client
        read past that point (the gateway drops the chunks it has by their numbers), a
        seam a model does not write the same way twice. Such an answer ends with an error.
        """
        if not (self.settings.resume_streams and job.stream and job.attempt > 1):
            return None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(keys.output(job.job_id), 0, -1)
            pipe.hget(keys.job(job.job_id), "replay_cut")
            messages, cut = await pipe.execute()
        partial = read_partial(messages)
        if cut:
            raise CannotContinue(partial.sent)
        return partial if partial.sent else None

    async def _forward(self, job: ClaimedJob, channel: str, message: bytes, *, seq: int) -> None:
        """Publish a chunk, and keep it in the job's output list for replay after a pub/sub loss.

        A Redis that refuses writes for a moment (``OOM`` at ``maxmemory``) or stalls pauses
        the stream rather than failing it: the chunk is sent again until it goes through
        (a copy sent twice is dropped by its sequence number). The first chunk goes all or
        nothing (MULTI): under ``OOM`` a bare pipeline would still publish it while its
        ``streamed`` mark was refused, and the job would be re-run from the start although
        its client has output. Later chunks skip MULTI (it cut the instant-token relay rate
        by about a third here): under ``OOM`` one may reach the client without its list
        entry, and a continuation after a node's death in that same moment would then
        start one chunk early, a chunk the gateway drops by its sequence number.

        The replay list keeps the first ``replay_max_messages`` chunks only (one long
        stream once copied 15 MB into it); the job's record is marked ``replay_cut`` at
        the cap, and ``finish.lua`` appends no final message to a cut list. Readers of a
        cut list (a gateway replaying after a pub/sub loss, a cache follower on another
        gateway) end their answer with an error rather than relay a gap."""
        out = keys.output(job.job_id)
        first = seq == 0
        keep = seq < self.settings.replay_max_messages
        cut = seq == self.settings.replay_max_messages

        async def send() -> None:
            async with self.redis.pipeline(transaction=first) as pipe:
                if first:  # from now on a re-run would repeat output the client has seen
                    pipe.hset(keys.job(job.job_id), "streamed", 1)
                    pipe.expire(out, self.settings.job_ttl)
                if keep:
                    pipe.rpush(out, message)
                elif cut:
                    pipe.hset(keys.job(job.job_id), "replay_cut", 1)
                pipe.publish(channel, message)
                await pipe.execute()

        if not await self._persist(send, f"forwarding a chunk of job {job.job_id}"):
            raise RedisUnavailable(f"node {self.node_id} could not forward the answer")

    async def _hand_back(self, job: ClaimedJob, sent: int, reason: str = "") -> None:
        """Give up a running job: requeue it, unless its client already has output and the
        next attempt could not continue it."""
        reason = reason or f"node {self.node_id} shut down"
        if sent and not self.settings.resume_streams:
            message = f"{reason} in the middle of this response"
            await self._settle(
                job,
                JobState.FAILED,
                error=message,
                status=503,
                message=protocol.encode_error(job.job_id, sent, message, 503),
            )
            return
        await self._persist(
            lambda: self.store.requeue(
                job.job_id, job.model, job.priority, job.entry_id, self.node_id, reason
            ),
            f"handing back job {job.job_id}",
        )
        log.info("job %s handed back to the queue", job.job_id)

    async def _settle(self, job: ClaimedJob, state: JobState, **outcome: Any) -> None:
        """Record the outcome, riding out a short Redis outage rather than losing it."""
        await self._persist(
            lambda: self.store.finish(job, self.node_id, state, **outcome),
            f"settling job {job.job_id}",
        )

    async def _persist(self, write: Callable[[], Awaitable[object]], what: str) -> bool:
        """Retry a job's Redis write through an outage (about half a minute); False if it
        never went through.

        If Redis stays away longer, the job stays pending under this node, and the
        stranded-entry check hands it back once Redis answers again.
        """
        for attempt in range(20):
            try:
                await write()
                return True
            except REDIS_WRITE_ERRORS as exc:
                log.warning("%s failed (try %d): %s", what, attempt + 1, exc)
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))  # backoff between retries
        log.error("%s failed for good; it will be handed back later", what)
        return False

    async def reclaim_stranded(self) -> int:
        """Hand back entries pending under this node id that no runner here holds.

        They come from a previous process with the same id (killed and restarted faster
        than the node TTL, so the scheduler never saw it die) or from a claim whose reply
        was lost. Entries younger than ``stranded_after`` seconds are left alone: their claim may
        still be on its way back to the claim loop.
        """
        mine = {job.entry_id for _, job in self._running.values()}
        handed = 0
        for (model, priority), entries in await self._own_pending(idle=self.stranded_after):
            for entry in entries:
                entry_id = text(entry["message_id"])
                if entry_id in mine:
                    continue
                found = await self.redis.xrange(keys.stream(model, priority), entry_id, entry_id)
                job_id = text((found[0][1] or {}).get(b"j", b"")) if found else ""
                await self.store.requeue(
                    job_id, model, priority, entry_id, self.node_id,
                    f"node {self.node_id} restarted while holding it",
                )  # fmt: skip
                handed += 1
        if handed:
            log.warning("worker %s handed back %d stranded job(s)", self.node_id, handed)
        return handed


def _parse_chunk(line: bytes) -> dict[str, Any]:
    """One NDJSON line of Ollama's answer; anything else is a failure of this node."""
    try:
        chunk = orjson.loads(line)
    except orjson.JSONDecodeError:
        chunk = None
    if not isinstance(chunk, dict):
        shown = line[:120].decode(errors="replace")
        raise BackendError(f"Ollama answered something that is not NDJSON: {shown!r}", 502,
                           retriable=True)  # fmt: skip
    return chunk
