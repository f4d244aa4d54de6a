"""The faults bench/chaos.py injects beside its kills and restarts, and their record.

Every disruption is switchable (``chaos.py --faults ... --without ...``) and leaves a
``Disruption`` behind: what, when (seconds since the run began), on which node, and the
jobs it caught where those are known. The reconciliation (``fault_report.py``) uses them
to tell which jobs each one hit.

| name | what happens |
|---|---|
| ``worker_kill`` | a random worker is SIGKILLed every few seconds, restarted under its id |
| ``gateway_kill`` | the gateway is SIGKILLed and restarted |
| ``scheduler_kill`` | the scheduler holding the lease (and its RQ worker) is SIGKILLed |
| ``redis_restart`` | Redis restarts gracefully (its AOF keeps everything) |
| ``redis_oom`` | Redis refuses writes: ``maxmemory`` 1 byte under ``noeviction``, then restored |
| ``redis_stall`` | redis-server is SIGSTOPped for longer than the clients' command timeout |
| ``garbage`` | one node spoils a share of its generations for a while (fake ``garbage_rate``) |
| ``slow_ps`` | one node's ``/api/ps`` is held back for a while (fake ``ps_delay``) |
| ``worker_stop`` | a worker holding jobs is SIGSTOPped and removed from the registry, as an
  operator would (``ZREM corral:nodes``, ``DEL corral:node:<id>``); SIGCONT later |
| ``clock_skew`` | workers run with ``CORRAL_CLOCK_OFFSET`` (+30 s, -30 s) all along |
| ``pubsub_kill`` | ``CLIENT KILL TYPE pubsub``: every subscriber's connection is cut |

``worker_stop`` ends with SIGCONT rather than SIGKILL: the woken worker still holds its
jobs and its open requests, which is the harder case (it may try to settle jobs that were
taken back meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from redis.asyncio import Redis

from corral import keys

if TYPE_CHECKING:
    from chaos import Chaos

KILLS = ("worker_kill", "gateway_kill", "scheduler_kill", "redis_restart")
FAULTS = (
    "redis_oom", "redis_stall", "garbage", "slow_ps", "worker_stop", "clock_skew", "pubsub_kill",
)  # fmt: skip
DISRUPTIONS = KILLS + FAULTS
AFTERMATH_S = 10.0
"""Seconds after a fault on a node during which no worker kill picks that node, so that
what the fault did is not hidden by a kill."""
NODE_DISRUPTIONS = {"worker_kill", "garbage", "slow_ps", "worker_stop", "clock_skew"}
"""Those that hit only the jobs that ran on their node."""


def parse_names(text: str) -> set[str]:
    """``all``, ``none``, ``kills``, ``faults`` or a comma-separated list of names."""
    groups = {"all": DISRUPTIONS, "kills": KILLS, "faults": FAULTS, "none": ()}
    names: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        if part in groups:
            names.update(groups[part])
        elif part in DISRUPTIONS:
            names.add(part)
        elif part:
            known = ", ".join((*groups, *DISRUPTIONS))
            raise ValueError(f"unknown disruption {part!r} (known: {known})")
    return names


@dataclass
class FaultSettings:
    oom_s: float = 2.0
    stall_s: float = 12.0
    """Longer than the 10 s command timeout of the Corral processes' Redis clients."""
    ps_delay_s: float = 9.0
    slow_ps_s: float = 12.0
    """How long the node's ``/api/ps`` stays slow (answers already held back still wait)."""
    stop_s: float = 8.0
    garbage_rate: float = 0.5
    garbage_after_tokens: int = 2
    garbage_s: tuple[float, float] = (4.0, 15.0)
    """The garbage window lasts at least the first, at most the second, and ends once
    ``garbage_answers`` were spoiled."""
    garbage_answers: int = 4
    """One of each kind: the fake takes them in turn."""
    clock_offsets: tuple[float, ...] = (30.0, -30.0)
    garbage_node: str = "n1"
    slow_ps_node: str = "n2"


@dataclass
class Disruption:
    kind: str
    start: float
    end: float
    node: str | None = None
    jobs: list[str] | None = None
    """Job ids it caught, where known (the jobs a killed or stopped worker held)."""
    detail: dict[str, Any] = field(default_factory=dict)


class Injector:
    """Injects the faults into a running ``Chaos`` fleet; each one records a Disruption."""

    def __init__(self, run: Chaos, settings: FaultSettings) -> None:
        self.run = run
        self.s = settings
        self.frozen: dict[int, str] = {}
        """pid -> name of every process SIGSTOPped and not yet continued."""

    # -- Redis

    async def redis_oom(self) -> None:
        """Writes fail with OOM errors for a while: maxmemory 1 byte under noeviction."""
        run = self.run
        async with run.client() as r:
            before = await r.config_get("maxmemory*")
            refused = await _oom_errors(r)
            start = run.now()
            await r.config_set("maxmemory-policy", "noeviction")
            await r.config_set("maxmemory", 1)
            run.event("redis refuses writes (maxmemory 1 byte, noeviction)")
            try:
                await asyncio.sleep(self.s.oom_s)
            finally:
                await r.config_set("maxmemory", before.get("maxmemory", "0"))
                await r.config_set("maxmemory-policy", before.get("maxmemory-policy", "noeviction"))
            refused = await _oom_errors(r) - refused
        run.disrupted("redis_oom", start, refused_writes=refused)
        run.event("redis takes writes again", oom_errors=refused)

    async def redis_stall(self) -> None:
        """The whole server stops answering (SIGSTOP) for longer than any command timeout."""
        run = self.run
        assert run.redis is not None and run.redis.pid is not None
        pid = run.redis.pid
        start = run.now()
        self._freeze(pid, "redis-server")
        run.event("SIGSTOP redis-server", pid=pid, for_s=self.s.stall_s)
        try:
            await asyncio.sleep(self.s.stall_s)
        finally:
            self._thaw(pid)
        run.disrupted("redis_stall", start, stalled_s=self.s.stall_s)
        run.event("SIGCONT redis-server", pid=pid)

    async def pubsub_kill(self) -> None:
        run = self.run
        start = run.now()
        async with run.client() as r:
            killed = int(await r.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
        run.disrupted("pubsub_kill", start, connections=killed)
        run.event("CLIENT KILL TYPE pubsub", connections=killed)

    # -- fake Ollama nodes

    async def garbage(self) -> None:
        """One node spoils a share of its generations until enough were spoiled."""
        run, node = self.run, self._node(self.s.garbage_node)
        before = await self._fake_stat(node, "garbage")
        start = run.now()
        run.spare(node)
        settings = {
            "garbage_rate": self.s.garbage_rate,
            "garbage_kind": "mixed",
            "garbage_after_tokens": self.s.garbage_after_tokens,
        }
        await self._configure(node, settings)
        run.event("fake answers garbage", node=node, **settings)
        shortest, longest = self.s.garbage_s
        spoiled = 0
        try:
            while run.now() - start < longest:
                await asyncio.sleep(0.5)
                spoiled = await self._fake_stat(node, "garbage") - before
                if run.now() - start >= shortest and spoiled >= self.s.garbage_answers:
                    break
        finally:
            await self._configure(node, {"garbage_rate": 0.0})
            run.spare(node, AFTERMATH_S)
        spoiled = await self._fake_stat(node, "garbage") - before
        run.disrupted("garbage", start, node=node, spoiled=spoiled)
        run.event("fake answers properly again", node=node, spoiled=spoiled)

    async def slow_ps(self) -> None:
        run, node = self.run, self._node(self.s.slow_ps_node)
        before = await self._fake_stat(node, "slow_ps")
        start = run.now()
        run.spare(node)
        await self._configure(node, {"ps_delay": self.s.ps_delay_s})
        run.event("fake /api/ps slow", node=node, delay_s=self.s.ps_delay_s)
        try:
            await asyncio.sleep(self.s.slow_ps_s)
        finally:
            await self._configure(node, {"ps_delay": 0.0})
            run.spare(node, self.s.ps_delay_s + AFTERMATH_S)
        held_back = await self._fake_stat(node, "slow_ps") - before
        # The last answers held back still take ps_delay_s: count them in the window.
        end = run.now() + self.s.ps_delay_s
        run.disrupted("slow_ps", start, node=node, end=end, slow_answers=held_back)
        run.event("fake /api/ps quick again", node=node, slow_answers=held_back)

    # -- workers

    async def worker_stop(self) -> None:
        """SIGSTOP the worker holding the most jobs, drop it from the registry, SIGCONT later."""
        run = self.run
        node, held = await self._busiest_worker()
        if node is None:
            run.event("no worker to stop")
            return
        child = run.workers[node]
        run.nodes_down.add(node)  # not restarted meanwhile
        run.spare(node)
        start = run.now()
        self._freeze(child.pid, child.name, group=True)
        async with run.client() as r, r.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.NODES, node)
            pipe.delete(keys.node(node))
            await pipe.execute()
        run.event(
            "SIGSTOP worker, removed from the registry", node=node, pid=child.pid,
            held=len(held), jobs=",".join(j[:8] for j in held),
        )  # fmt: skip
        try:
            await asyncio.sleep(self.s.stop_s)
        finally:
            self._thaw(child.pid, group=True)
            run.nodes_down.discard(node)
            run.spare(node, AFTERMATH_S)  # time for the woken worker to act on its old jobs
        run.disrupted("worker_stop", start, node=node, jobs=held, stopped_s=self.s.stop_s)
        run.event("SIGCONT worker", node=node, pid=child.pid)

    def clock_env(self, node: str) -> dict[str, str]:
        """The environment a worker starts with: a clock offset on the skewed nodes."""
        offset = self.skew_of(node)
        return {} if offset is None else {"CORRAL_CLOCK_OFFSET": f"{offset:g}"}

    def skew_of(self, node: str) -> float | None:
        if "clock_skew" not in self.run.enabled:
            return None
        nodes = sorted(self.run.fakes, key=lambda n: int(n[1:]))
        skewed = dict(zip(nodes[::-1], self.s.clock_offsets, strict=False))
        return skewed.get(node)

    # -- teardown

    def thaw_all(self) -> None:
        """SIGCONT whatever is still stopped (an interrupted run), so it can be stopped."""
        for pid in list(self.frozen):
            self._thaw(pid, group=True)
            self._thaw(pid)

    # -- helpers

    def _freeze(self, pid: int, name: str, *, group: bool = False) -> None:
        self.frozen[pid] = name
        (os.killpg if group else os.kill)(pid, signal.SIGSTOP)

    def _thaw(self, pid: int, *, group: bool = False) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            (os.killpg if group else os.kill)(pid, signal.SIGCONT)
        self.frozen.pop(pid, None)

    def _node(self, wanted: str) -> str:
        return wanted if wanted in self.run.fakes else sorted(self.run.fakes)[0]

    async def _busiest_worker(self) -> tuple[str | None, list[str]]:
        """The live worker holding the most jobs; waits up to 5 s for one to hold any."""
        run = self.run
        deadline = time.monotonic() + 5.0
        best: tuple[str | None, list[str]] = (None, [])
        async with run.client() as r:
            while True:
                for node in sorted(set(run.workers) - run.nodes_down - run.spared()):
                    held = await held_by(r, node, run.model)
                    if best[0] is None or len(held) > len(best[1]):
                        best = (node, held)
                if best[1] or time.monotonic() > deadline:
                    return best
                best = (None, [])
                await asyncio.sleep(0.2)

    async def _configure(self, node: str, changes: dict[str, Any]) -> None:
        port = self.run.fakes[node][1]
        async with httpx.AsyncClient(timeout=5.0) as http:
            resp = await http.post(f"http://127.0.0.1:{port}/_fake/config", json=changes)
            resp.raise_for_status()

    async def _fake_stat(self, node: str, name: str) -> int:
        port = self.run.fakes[node][1]
        async with httpx.AsyncClient(timeout=5.0) as http:
            resp = await http.get(f"http://127.0.0.1:{port}/_fake/stats")
            return int(resp.json().get(name, 0))


class RegistryWatch:
    """Spells when a node looked dead in the registry (its ``corral:nodes`` score older than
    the node TTL, by Redis's clock) although its worker process was up, neither stopped nor
    being restarted: a heartbeat that stalled or died. For information: it is the registry's
    rule of today, sampled every quarter second."""

    def __init__(self, run: Chaos, node_ttl: float) -> None:
        self.run = run
        self.node_ttl = node_ttl
        self.spells: list[tuple[str, float, float]] = []
        self._open: dict[str, float] = {}

    async def watch(self) -> None:
        run = self.run
        while True:
            await asyncio.sleep(0.25)  # a sampling period
            try:
                async with run.client() as r:
                    seconds, micros = await r.time()
                    scores = {
                        _text(node): float(score)
                        for node, score in await r.zrange(keys.NODES, 0, -1, withscores=True)
                    }
            except Exception:  # Redis stalled or restarting: no sample this time
                continue
            now, at = seconds + micros / 1e6, run.now()
            for node, child in run.workers.items():
                excused = (
                    node in run.nodes_down or not child.alive or child.pid in run.faults.frozen
                )
                score = scores.get(node)
                dead = not excused and (score is None or now - score > self.node_ttl)
                if dead:
                    self._open.setdefault(node, at)
                elif node in self._open:
                    self.spells.append((node, self._open.pop(node), at))

    def finish(self, at: float) -> list[tuple[str, float, float]]:
        for node, began in self._open.items():
            self.spells.append((node, began, at))
        self._open.clear()
        return sorted(self.spells, key=lambda spell: spell[1])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def held_by(r: Redis, node: str, model: str) -> list[str]:
    """Job ids of the stream entries ``node`` has claimed and not settled."""
    held = []
    for priority in keys.PRIORITIES:
        stream = keys.stream(model, priority)
        if not await r.exists(stream):
            continue
        rows = await r.xpending_range(
            stream, keys.GROUP, min="-", max="+", count=1000, consumername=node
        )
        for row in rows:
            entries = await r.xrange(stream, row["message_id"], row["message_id"])
            if entries:
                held.append(_text(entries[0][1].get(b"j") or b""))
    return held


async def _oom_errors(r: Redis) -> int:
    """OOM replies Redis has sent so far (``INFO errorstats``)."""
    stats = await r.info("errorstats")
    entry = stats.get("errorstat_OOM") or {}
    return int(entry.get("count", 0)) if isinstance(entry, dict) else 0
