"""Chaos test: kill things and inject faults while jobs flow, then account for every job.

    python bench/chaos.py                 # 2,000 jobs, every disruption, some several times
    python bench/chaos.py --short         # CI-sized (about two minutes), each one at least once
    python bench/chaos.py --faults redis_stall --short    # one fault alone
    python bench/chaos.py --without kills,clock_skew      # the faults, without the kills
    python bench/chaos.py --jobs 5000 --seed 7 --json out.json

The promise under test: every accepted job ends done, failed with a reason, cancelled,
expired or dead-lettered -- never lost, never answered twice, and a generation that had
not started streaming to its client never runs to completion twice.

It starts Redis (AOF on, ``appendfsync everysec``), fake Ollama nodes with a worker each,
one gateway and two schedulers (one active, one standing by), every one its own process
with short liveness settings. Concurrent clients submit jobs with unique prompts at a
steady pace (the fake answers ``"echo: " + prompt``, so every answer can be checked):
waiting clients on ``/api/generate``, streaming and not, and ``POST /jobs`` with
``wait: false`` polled through ``GET /jobs/{id}``. Meanwhile the disruptions of
``faults.py`` happen, each switchable: a random worker SIGKILLed every few seconds and
restarted under the same node id; at set fractions of the jobs, the gateway and the
active scheduler SIGKILLed and restarted, Redis restarted (gracefully), Redis refusing
writes (OOM), Redis stalled (SIGSTOP) past the clients' command timeout, a node
answering garbage, a node's ``/api/ps`` slow, a worker stopped (SIGSTOP) and removed from
the registry, every pub/sub connection killed; and all along, two workers with skewed
clocks (``CORRAL_CLOCK_OFFSET``).

After a drain period every job is reconciled: what its client got against its record in
Redis (``corral:job:<id>``) and the fakes' per-request counters (``/_fake/runs``).

* ``lost``: an accepted job (its client got an id, or a record exists for its prompt)
  with no record or a non-final state at the end, or a waiting client that never got any
  answer although its gateway stayed up (the client hung until the drain deadline).
* ``answered_twice``: a stream with two final lines or its text twice, two job records for
  one request, or more settlements counted in ``corral:stats`` than jobs that ended.
* ``wrong``: an answer (to the client or in the record) that is not ``"echo: " + prompt``,
  or a client told one outcome while the record says another.
* ``ran_twice``: a job whose generation ran to completion on the nodes more than once
  although its client had no chunk yet when the disruption hit it. Those whose client
  had started streaming, and those whose first completion reached a worker that was
  stopped or being killed, are reported apart and allowed (``fault_report.py``).

The report gives the disruptions injected (a count of each), a table of the jobs each one
hit and how they ended, and client-visible errors by kind and by disruption. The last line
printed is ``lost=N answered_twice=M ran_twice=K wrong=W ...``; the exit status is 1 when
any of those is non-zero or an enabled disruption was never injected. The logs of every
process stay in a temporary directory whose path is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import inspect
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fault_report
import httpx
import orjson
from faults import (
    DISRUPTIONS,
    Disruption,
    FaultSettings,
    Injector,
    RegistryWatch,
    held_by,
    parse_names,
)
from redis.asyncio import Redis

from corral import keys
from corral.children import Child, stop_all
from corral.tasks import cancel_and_wait
from corral.tooling.redis_proc import RedisProcess, free_port

MODEL = "chaos:latest"
FINAL = {s.value for s in keys.FINAL_STATES}
WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)  # fmt: skip


# -- settings ------------------------------------------------------------------------


@dataclass
class Profile:
    jobs: int
    schedule: tuple[tuple[float, str], ...]
    """(fraction of the jobs submitted, disruption) for the one-off disruptions, in order;
    each waits for the one before it to end."""
    rate: float
    """Jobs submitted per second (at most ``concurrency`` in flight): the pace that
    spreads the jobs over every disruption."""
    nodes: int = 4
    slots: int = 3
    token_rate: float = 15.0
    """Tokens per second: answers of 5 to 16 tokens take about a second, so every
    disruption finds jobs under way."""
    concurrency: int = 48
    async_share: float = 0.2
    """Share of jobs sent as ``POST /jobs`` with ``wait: false`` (then polled)."""
    stream_share: float = 0.55
    """Of the waiting clients, the share that stream."""
    fail_rate: float = 0.03
    """Injected retriable 500s on the fakes, so retries go through RQ."""
    kill_every: tuple[float, float] = (10.0, 16.0)
    """Seconds between worker kills."""
    faults: FaultSettings = field(default_factory=FaultSettings)
    drain_s: float = 90.0
    limit_s: float = 1200.0


FULL = Profile(
    jobs=2000,
    rate=12.0,
    schedule=(
        (0.03, "pubsub_kill"), (0.06, "garbage"), (0.14, "redis_oom"), (0.20, "gateway_kill"),
        (0.25, "slow_ps"), (0.36, "pubsub_kill"), (0.40, "worker_stop"),
        (0.48, "scheduler_kill"), (0.52, "redis_stall"), (0.62, "pubsub_kill"),
        (0.66, "redis_restart"), (0.70, "redis_oom"), (0.75, "garbage"), (0.82, "slow_ps"),
        (0.88, "worker_stop"), (0.94, "pubsub_kill"),
    ),
)  # fmt: skip
SHORT = Profile(
    jobs=520,
    rate=8.0,
    schedule=(
        (0.04, "pubsub_kill"), (0.08, "garbage"), (0.24, "redis_oom"), (0.30, "gateway_kill"),
        (0.36, "slow_ps"), (0.55, "worker_stop"), (0.68, "scheduler_kill"),
        (0.72, "redis_stall"), (0.86, "pubsub_kill"), (0.92, "redis_restart"),
    ),
    concurrency=32,
    kill_every=(5.0, 8.0),
    drain_s=30.0,
    limit_s=170.0,
)  # fmt: skip

NODE_TTL = 2.0
COMMON = [
    "--node-ttl", str(NODE_TTL),
    "--log-level", "INFO",
    # Long record TTLs so that every record is still there to audit at the end.
    "--job-ttl", "7200",
    "--result-ttl", "7200",
    # Written into each job by the gateway; every path that puts a job back enforces it.
    "--max-attempts", "3",
]  # fmt: skip
WORKER = ["--heartbeat-interval", "0.5", "--drain-timeout", "2"]
GATEWAY = ["--fleet-refresh", "0.5"]
SCHEDULER = [
    "--interval", "0.2", "--lease-ttl", "2", "--retry-base", "0.5", "--retry-cap", "2",
]  # fmt: skip


# -- child processes -------------------------------------------------------------------

_CHILDREN: list[Child] = []


def _child_env() -> dict[str, str]:
    # Settings come from our flags only: drop CORRAL_* / OLLAMA_* from the caller's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "OLLAMA_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_child(
    name: str, argv: list[str], log_dir: Path, t0: float, env: dict[str, str] | None = None
) -> Child:
    """One process in its own session (so a kill takes its children too), logging to
    ``<name>.log``: every incarnation of a name appends to it, after a marker line."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        log.write(f"===== chaos: starting {name} at t={time.time() - t0:.3f}s =====\n".encode())
    env = {**_child_env(), **(env or {})}
    child = Child(name, argv, log=log_path, env=env, cwd=Path(__file__).resolve().parents[1])
    _CHILDREN.append(child)
    return child


def kill_all_children() -> None:
    for child in _CHILDREN:
        child.kill()


def corral(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral.cli", *args]


# -- what each client saw ----------------------------------------------------------------


@dataclass
class ClientJob:
    index: int
    mode: str  # "stream", "single" (waiting, stream: false) or "async" (wait: false, polled)
    prompt: str
    priority: int
    job_id: str | None = None
    outcome: str = "pending"
    """answer | error | http_error | conn_lost | truncated | garbled | hung | not_sent |
    client_error"""
    status: int | None = None
    error: str | None = None
    text: str = ""
    done_lines: int = 0
    error_lines: int = 0
    connect_retries: int = 0
    gateway_gen: int = -1
    sent_at: float = 0.0
    ended_at: float = 0.0
    first_chunk_at: float | None = None
    """When a streaming client got its first chunk (seconds since the run began)."""
    polled_state: str | None = None
    poll_timeouts: int = 0

    @property
    def expected(self) -> str:
        return f"echo: {self.prompt}"


# -- the run -------------------------------------------------------------------------------


class Chaos:
    def __init__(
        self, profile: Profile, seed: int, log_dir: Path, enabled: set[str] | None = None
    ) -> None:
        self.p = profile
        self.enabled = [d for d in DISRUPTIONS if enabled is None or d in enabled]
        self.model = MODEL
        self.faults = Injector(self, profile.faults)
        self.registry = RegistryWatch(self, NODE_TTL)
        self.disruptions: list[Disruption] = []
        self.injected = collections.Counter[str]()
        self.spared_until: dict[str, float] = {}
        """Node -> until when (monotonic) worker kills leave it alone: a fault of its own is
        on, or just ended and its effects are still to be seen."""
        self.rng = random.Random(seed)
        self.seed = seed
        self.log_dir = log_dir
        self.t0 = time.time()
        self.events: list[dict[str, Any]] = []
        self.redis: RedisProcess | None = None
        self.fakes: dict[str, tuple[Child, int]] = {}
        self.workers: dict[str, Child] = {}
        self.gateway: Child | None = None
        self.gateway_port = free_port()
        self.gateway_gen = 0
        self.gateway_down = False
        self.schedulers: dict[str, Child] = {}
        self.jobs: list[ClientJob] = []
        self.submitted = 0
        self.submitting = True
        self.submissions_over = asyncio.Event()
        self.client_deadline = 0.0
        self.hard_deadline = 0.0
        self.snapshot: dict[str, Any] = {}
        self.schedulers_down: set[str] = set()
        self.crashes = collections.Counter[str]()
        self.report: dict[str, Any] = {}
        self.nodes_down: set[str] = set()

    # -- helpers

    def now(self) -> float:
        return time.time() - self.t0

    def disrupted(
        self,
        kind: str,
        start: float,
        *,
        node: str | None = None,
        jobs: list[str] | None = None,
        end: float | None = None,
        **detail: Any,
    ) -> None:
        """Record a disruption that began at ``start`` and ended now (or at ``end``)."""
        end = self.now() if end is None else end
        self.disruptions.append(Disruption(kind, start, end, node, jobs, detail))
        self.injected[kind] += 1

    def spare(self, node: str, seconds: float = math.inf) -> None:
        self.spared_until[node] = time.monotonic() + seconds

    def spared(self) -> set[str]:
        now = time.monotonic()
        return {node for node, until in self.spared_until.items() if until > now}

    def event(self, kind: str, **detail: Any) -> None:
        entry = {"t": round(self.now(), 3), "kind": kind, **detail}
        self.events.append(entry)
        extra = " ".join(f"{k}={v}" for k, v in detail.items())
        print(f"[{entry['t']:8.2f}s] {kind} {extra}", flush=True)

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def client(self) -> Redis:
        return Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)

    async def until(self, check: Any, within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(Exception):
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {within:g}s (logs: {self.log_dir})")
            await asyncio.sleep(0.1)

    # -- fleet

    async def start_fleet(self) -> None:
        self.redis = RedisProcess(
            appendonly=True,
            extra_args=["--logfile", str(self.log_dir / "redis.log"), "--maxclients", "10000"],
        )
        await asyncio.to_thread(self.redis.start)
        local = datetime.fromtimestamp(self.t0).strftime("%H:%M:%S.%f")[:-3]
        self.event("redis started", url=self.redis_url, t0_local_time=local)
        for n in range(1, self.p.nodes + 1):
            node = f"n{n}"
            port = free_port()
            argv = corral(
                "fake-ollama", "--port", str(port), "--models", MODEL, "--preload", MODEL,
                "--num-parallel", str(self.p.slots), "--token-rate", str(self.p.token_rate),
                "--fail-rate", str(self.p.fail_rate), "--seed", str(self.seed * 100 + n),
                "--max-queue", "1024",
            )  # fmt: skip
            self.fakes[node] = (start_child(f"fake-{node}", argv, self.log_dir, self.t0), port)
        for node, (_, port) in self.fakes.items():
            await self.until(
                lambda port=port: _http_ok(f"http://127.0.0.1:{port}/api/version"),
                30,
                f"fake {node}",
            )
        for node in self.fakes:
            self.start_worker(node)
        for name in ("a", "b"):
            self.start_scheduler(name)
        self.start_gateway()
        async with self.client() as r:
            await self.until(
                lambda: _count_nodes(r, self.p.nodes), 30, f"{self.p.nodes} worker heartbeats"
            )
            await self.until(lambda: r.exists(keys.SCHEDULER_LEASE), 30, "a scheduler lease")
        await self.wait_gateway()
        self.event("fleet ready", nodes=self.p.nodes, slots=self.p.slots, logs=str(self.log_dir))

    def start_worker(self, node: str) -> None:
        port = self.fakes[node][1]
        argv = corral(
            "worker", "--redis-url", self.redis_url, "--ollama-url", f"http://127.0.0.1:{port}",
            "--node-id", node, "--num-parallel", str(self.p.slots), *COMMON, *WORKER,
        )  # fmt: skip
        env = self.faults.clock_env(node)
        self.workers[node] = start_child(f"worker-{node}", argv, self.log_dir, self.t0, env)
        if env:
            # Lasts as long as this process: to the end of the run unless it is killed.
            self.disrupted(
                "clock_skew", self.now(), node=node, end=math.inf, offset=env["CORRAL_CLOCK_OFFSET"]
            )

    def start_scheduler(self, name: str) -> None:
        argv = corral("scheduler", "--redis-url", self.redis_url, *COMMON, *SCHEDULER)
        self.schedulers[name] = start_child(f"scheduler-{name}", argv, self.log_dir, self.t0)

    def start_gateway(self) -> None:
        argv = corral(
            "gateway", "--redis-url", self.redis_url, "--port", str(self.gateway_port),
            *COMMON, *GATEWAY,
        )  # fmt: skip
        self.gateway = start_child("gateway", argv, self.log_dir, self.t0)

    async def wait_gateway(self) -> None:
        url = self.gateway_url + "/healthz"

        async def healthy() -> bool:
            raw = await asyncio.to_thread(_http_ok, url)
            return bool(raw) and orjson.loads(raw).get("nodes", 0) >= 1

        await self.until(healthy, 30, "gateway")

    def stop_fleet(self) -> None:
        self.faults.thaw_all()  # a stopped process could not even take a SIGTERM
        # Gracefully first (so logs end cleanly), then SIGKILL whatever is left of each group.
        groups = [
            [c for c in [self.gateway] if c is not None],
            list(self.workers.values()) + list(self.schedulers.values()),
            [fake for fake, _ in self.fakes.values()],
        ]
        for group in groups:
            stop_all(group, 8)
        kill_all_children()
        if self.redis is not None:
            self.redis.stop()

    # -- chaos

    async def chaos(self) -> None:
        """The one-off disruptions at fractions of the jobs submitted, one after the other;
        worker kills on a timer meanwhile."""
        actions = {
            "gateway_kill": self.kill_gateway,
            "scheduler_kill": self.kill_scheduler,
            "redis_restart": self.restart_redis,
            "redis_oom": self.faults.redis_oom,
            "redis_stall": self.faults.redis_stall,
            "garbage": self.faults.garbage,
            "slow_ps": self.faults.slow_ps,
            "worker_stop": self.faults.worker_stop,
            "pubsub_kill": self.faults.pubsub_kill,
        }
        one_offs = [(at, name) for at, name in self.p.schedule if name in self.enabled]
        kills = asyncio.create_task(self.worker_kills()) if "worker_kill" in self.enabled else None
        try:
            while self.submitting or one_offs:
                progress = self.submitted / self.p.jobs
                if one_offs and (progress >= one_offs[0][0] or not self.submitting):
                    _, name = one_offs.pop(0)
                    try:
                        await actions[name]()
                    except Exception as exc:  # reported as not injected; the run goes on
                        self.event("disruption failed", name=name, error=repr(exc))
                    continue
                await asyncio.sleep(0.05)
        finally:
            if kills is not None:
                await asyncio.wait([kills])
        if kills is not None and kills.exception():
            raise kills.exception()  # type: ignore[misc]

    async def worker_kills(self) -> None:
        restarts: set[asyncio.Task[None]] = set()
        while self.submitting:
            with contextlib.suppress(TimeoutError):
                pause = self.rng.uniform(*self.p.kill_every)
                await asyncio.wait_for(self.submissions_over.wait(), pause)
            if self.submitting:
                task = asyncio.create_task(self.kill_worker())
                restarts.add(task)
                task.add_done_callback(restarts.discard)
        if restarts:
            await asyncio.wait(restarts)

    async def supervise(self) -> None:
        """Restart a process that exited by itself, as systemd's ``Restart=on-failure`` would.

        Such an exit is a finding of its own (reported under "unexpected exits").
        """
        while True:
            await asyncio.sleep(0.5)
            for node, child in list(self.workers.items()):
                if node not in self.nodes_down and not child.alive:
                    self._exited(child)
                    self.start_worker(node)
            for name, child in list(self.schedulers.items()):
                if name not in self.schedulers_down and not child.alive:
                    self._exited(child)
                    self.start_scheduler(name)
            if self.gateway is not None and not self.gateway_down and not self.gateway.alive:
                self._exited(self.gateway)
                self.start_gateway()
            for node, (fake, _) in list(self.fakes.items()):
                if not fake.alive:
                    self._exited(fake)
                    self.fakes[node] = (start_child(fake.name, fake.argv, self.log_dir, self.t0), _)

    def _exited(self, child: Child) -> None:
        self.crashes[child.name] += 1
        last = ""
        with contextlib.suppress(OSError):
            tail = child.log_path.read_bytes()[-20000:].decode(errors="replace")
            errors = re.findall(r"^[A-Za-z_][\w.]*(?:Error|Exception|Unavailable)\b.*$", tail, re.M)
            last = errors[-1][:160] if errors else ""
        self.event(
            "process exited by itself; restarting it",
            name=child.name,
            code=child.popen.returncode,
            log=child.log_path.name,
            last_error=repr(last),
        )

    async def kill_worker(self) -> None:
        """SIGKILL a worker; restart it under the same node id.

        Kills alternate between a quick restart (as systemd's ``Restart=always`` would: the
        new process heartbeats before the old one's heartbeat is ``--node-ttl`` old) and a
        slow one (the scheduler sees the node dead first).
        """
        up = sorted(set(self.workers) - self.nodes_down - self.spared())
        if not up:
            return
        node = self.rng.choice(up)
        self.nodes_down.add(node)
        child = self.workers[node]
        quick = self.injected["worker_kill"] % 2 == 0
        delay = self.rng.uniform(0.05, 0.4) if quick else self.rng.uniform(2.5, 4.0)
        held: list[str] | None = None  # None: Redis did not say
        last_beat = None
        with contextlib.suppress(Exception):
            async with self.client() as r:
                last_beat = await r.zscore(keys.NODES, node)
                held = await held_by(r, node, MODEL)
        killed_at = self.now()
        await asyncio.to_thread(child.kill)
        self.event(
            "SIGKILL worker", node=node, pid=child.pid, held="?" if held is None else len(held),
            restart_in=f"{delay:.2f}s", jobs=",".join(j[:8] for j in held or []),
        )  # fmt: skip
        await asyncio.sleep(delay)
        self.start_worker(node)
        gap: float | None = None
        with contextlib.suppress(Exception):
            async with self.client() as r:

                async def beat() -> bool:
                    nonlocal gap
                    if not self.workers[node].alive:
                        return True  # died at once: the supervisor restarts it
                    score = await r.zscore(keys.NODES, node)
                    if score is not None and (last_beat is None or score > last_beat + 0.01):
                        gap = score - last_beat if last_beat else None
                        return True
                    return False

                await self.until(beat, 30, f"worker {node} heartbeat")
        self.nodes_down.discard(node)  # only once it is back: never kill one still starting
        self.disrupted("worker_kill", killed_at, node=node, jobs=held, restart_in=round(delay, 2))
        self.event(
            "worker restarted", node=node, pid=self.workers[node].pid,
            heartbeat_gap=f"{gap:.2f}s" if gap is not None else "?",
            within_node_ttl=gap is not None and gap < NODE_TTL,
        )  # fmt: skip

    async def kill_gateway(self) -> None:
        assert self.gateway is not None
        old = self.gateway
        self.gateway_down = True
        self.gateway_gen += 1
        start = self.now()
        await asyncio.to_thread(old.kill)
        self.event("SIGKILL gateway", pid=old.pid)
        await asyncio.sleep(1.0)
        self.start_gateway()
        await self.wait_gateway()
        self.gateway_down = False
        self.disrupted("gateway_kill", start)
        self.event("gateway restarted", pid=self.gateway.pid)

    async def kill_scheduler(self) -> None:
        async with self.client() as r:
            holder = await r.get(keys.SCHEDULER_LEASE)
        if holder is None:
            self.event("no scheduler holds the lease; killing none")
            return
        pid = int(holder.decode().split("-")[-2])
        name = next((n for n, c in self.schedulers.items() if c.pid == pid), None)
        if name is None:
            self.event("lease holder is not one of ours", holder=holder.decode())
            return
        child = self.schedulers[name]
        self.schedulers_down.add(name)
        start = self.now()
        await asyncio.to_thread(child.kill)  # the whole group: its RQ worker child dies too
        self.event("SIGKILL active scheduler (and its RQ worker)", name=name, pid=pid)
        await asyncio.sleep(1.0)
        self.start_scheduler(name)
        self.schedulers_down.discard(name)
        self.disrupted("scheduler_kill", start)
        self.event("scheduler restarted", name=name, pid=self.schedulers[name].pid)

    async def restart_redis(self) -> None:
        assert self.redis is not None
        started = time.monotonic()
        start = self.now()
        self.event("restarting redis (graceful, AOF)")
        await asyncio.to_thread(self.redis.restart)
        self.disrupted("redis_restart", start)
        self.event("redis back", down_s=f"{time.monotonic() - started:.2f}")

    # -- clients

    async def submit_all(self) -> None:
        slots = asyncio.Semaphore(self.p.concurrency)
        tasks: list[asyncio.Task[None]] = []
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=self.p.concurrency)
        timeout = httpx.Timeout(connect=5.0, read=None, write=10.0, pool=None)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            interval = 1.0 / self.p.rate if self.p.rate > 0 else 0.0
            next_at = time.monotonic()
            try:
                for index in range(self.p.jobs):
                    if time.monotonic() > self.client_deadline - self.p.drain_s:
                        self.event("time limit: stopping submissions", submitted=index)
                        break
                    # A steady pace, no catching up after a stall: the load of a busy fleet.
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    job = self.new_job(index)
                    self.jobs.append(job)
                    await slots.acquire()
                    next_at = time.monotonic() + interval
                    self.submitted += 1
                    tasks.append(asyncio.create_task(self.run_client(http, job, slots)))
            finally:
                self.submitting = False
                self.submissions_over.set()
                self.client_deadline = min(self.client_deadline, time.monotonic() + self.p.drain_s)
            self.event("all submitted", jobs=len(self.jobs))
            await self.drain(tasks)

    def new_job(self, index: int) -> ClientJob:
        words = [self.rng.choice(WORDS) for _ in range(self.rng.randint(3, 14))]
        prompt = f"s{self.seed} job{index} " + " ".join(words)
        roll = self.rng.random()
        if roll < self.p.async_share:
            mode = "async"
        elif self.rng.random() < self.p.stream_share:
            mode = "stream"
        else:
            mode = "single"
        return ClientJob(index, mode, prompt, self.rng.choice((2, 5, 5, 7)))

    async def run_client(
        self, http: httpx.AsyncClient, job: ClientJob, slots: asyncio.Semaphore
    ) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slots.release()

        try:
            if job.mode == "async":
                await self.submit_async(http, job)
                release()
                if job.job_id:
                    await self.poll(http, job)
            else:
                await self.wait_for_answer(http, job)
        except asyncio.CancelledError:
            if job.outcome == "pending":
                job.outcome = "hung"
            raise
        except Exception as exc:  # a bug of this client, or a reply it cannot read
            job.outcome = "client_error"
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            job.ended_at = job.ended_at or self.now()
            release()

    async def _send(self, make: Any, job: ClientJob) -> Any:
        """Connect errors (nothing was sent: the gateway is down) are retried; others are not."""
        while True:
            job.sent_at = self.now()
            job.gateway_gen = self.gateway_gen
            try:
                return await make()
            except (httpx.ConnectError, httpx.ConnectTimeout):
                job.connect_retries += 1
                if time.monotonic() > self.client_deadline:
                    job.outcome = "not_sent"
                    return None
                await asyncio.sleep(0.2)

    def _why_lost(self) -> str:
        return "(gateway killed) " if self.gateway_down else ""

    async def wait_for_answer(self, http: httpx.AsyncClient, job: ClientJob) -> None:
        body = _request(job, stream=job.mode == "stream")
        headers = {"x-corral-priority": str(job.priority)}
        url = self.gateway_url + "/api/generate"

        async def attempt() -> bool:
            async with http.stream("POST", url, json=body, headers=headers) as resp:
                job.job_id = resp.headers.get("x-corral-job-id")
                job.status = resp.status_code
                if resp.status_code != 200:
                    raw = await resp.aread()
                    job.outcome = "http_error"
                    job.error = _error_text(raw)
                    return True
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    obj = orjson.loads(line)
                    if "error" in obj:
                        job.error_lines += 1
                        job.error = str(obj["error"])
                    else:
                        if job.first_chunk_at is None and job.mode == "stream":
                            job.first_chunk_at = self.now()
                        job.text += str(obj.get("response", ""))
                        job.done_lines += bool(obj.get("done"))
            if job.done_lines:
                job.outcome = "answer"
            elif job.error_lines:
                job.outcome = "error"
            else:
                job.outcome = "truncated"
            return True

        try:
            await self._send(attempt, job)
        except httpx.TransportError as exc:
            job.outcome = "conn_lost"
            job.error = f"{self._why_lost()}{type(exc).__name__}: {exc}"
        except orjson.JSONDecodeError as exc:
            job.outcome = "garbled"
            job.error = str(exc)
        job.ended_at = self.now()

    async def submit_async(self, http: httpx.AsyncClient, job: ClientJob) -> None:
        body = {
            "kind": "generate",
            "request": _request(job, stream=False),
            "priority": job.priority,
            "wait": False,
        }
        try:
            resp = await self._send(lambda: http.post(self.gateway_url + "/jobs", json=body), job)
        except httpx.TransportError as exc:
            job.outcome = "conn_lost"
            job.error = f"{self._why_lost()}{type(exc).__name__}: {exc}"
            return
        if resp is None:
            return
        job.status = resp.status_code
        if resp.status_code != 202:
            job.outcome = "http_error"
            job.error = _error_text(resp.content)
            return
        job.job_id = str(resp.json()["id"])

    async def poll(self, http: httpx.AsyncClient, job: ClientJob) -> None:
        interval = 0.3
        while True:
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 2.0)
            try:
                resp = await http.get(f"{self.gateway_url}/jobs/{job.job_id}", timeout=15.0)
            except httpx.TimeoutException:
                job.poll_timeouts += 1  # the gateway took the request and did not answer
                continue
            except httpx.TransportError:
                continue  # gateway down: ask again
            if resp.status_code == 404:
                job.polled_state = "not found"
                continue
            if resp.status_code != 200:
                continue  # 503 while Redis restarts
            view = resp.json()
            job.polled_state = view.get("state")
            if job.polled_state in FINAL:
                if job.polled_state == "done":
                    job.outcome = "answer"
                    job.done_lines = 1
                    job.text = str((view.get("result") or {}).get("response", ""))
                else:
                    job.outcome = "error"
                    job.status = view.get("status")
                    job.error = view.get("error")
                job.ended_at = self.now()
                return

    async def drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait (with a deadline) for every client to finish and every record to end."""
        started = time.monotonic()
        pending = {t for t in tasks if not t.done()}
        while pending and time.monotonic() < self.client_deadline:
            _, pending = await asyncio.wait(pending, timeout=1.0)
        unfinished = await self._unfinished_records()
        while unfinished and time.monotonic() < self.client_deadline:
            await asyncio.sleep(0.5)
            unfinished = await self._unfinished_records()
        self.event(
            "drain over", waited_s=f"{time.monotonic() - started:.1f}",
            clients_still_waiting=len(pending), records_not_final=unfinished,
        )  # fmt: skip
        # Snapshot before the hung clients go away (their leaving would cancel their jobs).
        self.snapshot = await self.read_state()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _unfinished_records(self) -> int:
        with contextlib.suppress(Exception):
            async with self.client() as r:
                count = 0
                async for key in r.scan_iter(match=keys.job("*"), count=1000):
                    state = await r.hget(key, "state")
                    count += state is not None and state.decode() not in FINAL
                return count
        return -1

    # -- reading the outcome

    async def read_state(self) -> dict[str, Any]:
        async with self.client() as r:
            records: dict[str, dict[str, Any]] = {}
            names = [k async for k in r.scan_iter(match=keys.job("*"), count=1000)]
            async with r.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(name)
                raw = await pipe.execute()
            for name, fields in zip(names, raw, strict=True):
                rec = {k.decode(): v for k, v in fields.items()}
                records[name.decode().rsplit(":", 1)[1]] = rec
            stats = {k.decode(): int(v) for k, v in (await r.hgetall(keys.STATS)).items()}
            nodes = {}
            for node in self.workers:
                raw_node = await r.get(keys.node(node))
                nodes[node] = orjson.loads(raw_node) if raw_node else None
            pending: dict[str, list[Any]] = {}
            for priority in keys.PRIORITIES:
                stream = keys.stream(MODEL, priority)
                if await r.exists(stream):
                    rows = await r.xpending_range(stream, keys.GROUP, min="-", max="+", count=10000)
                    for row in rows:
                        pending.setdefault(_text(row["consumer"]), []).append(
                            _text(row["message_id"])
                        )
            retry_inbox = await r.llen(keys.RETRY_INBOX)
            scheduled = await r.zcard("rq:scheduled:" + keys.RETRY_QUEUE)
        # A fake whose worker was killed stayed up: its counts cover the whole run.
        runs: dict[str, list[dict[str, Any]]] = {}
        for node, (_, port) in self.fakes.items():
            raw = await asyncio.to_thread(_http_ok, f"http://127.0.0.1:{port}/_fake/runs")
            runs[node] = orjson.loads(raw or b"{}").get("runs", [])
        by_prompt = fault_report.runs_by_prompt(runs, self.t0)
        started = {
            prompt: [(node, t) for t, node in fault_report.JobView.starts_of(node_runs)]
            for prompt, node_runs in by_prompt.items()
        }
        return {
            "records": records,
            "stats": stats,
            "nodes": nodes,
            "pending": pending,
            "retry_inbox": retry_inbox,
            "rq_scheduled": scheduled,
            "started": started,
            "runs": by_prompt,
        }


# -- reconciliation ----------------------------------------------------------------------


@dataclass
class Verdict:
    lost: list[dict[str, Any]] = field(default_factory=list)
    answered_twice: list[dict[str, Any]] = field(default_factory=list)
    wrong: list[dict[str, Any]] = field(default_factory=list)
    ran_twice: list[dict[str, Any]] = field(default_factory=list)
    """Only those that count against the target (fault_report's ``target`` bucket)."""
    states: collections.Counter[str] = field(default_factory=collections.Counter)
    clients: collections.Counter[str] = field(default_factory=collections.Counter)
    client_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted: int = 0
    not_accepted: int = 0
    settle_check: dict[str, int] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    slowest: list[dict[str, Any]] = field(default_factory=list)
    faults: fault_report.FaultReport | None = None
    not_injected: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(
            self.lost or self.answered_twice or self.wrong or self.ran_twice or self.not_injected
        )


def _prompt_of(rec: dict[str, Any]) -> str | None:
    """The prompt a record was for: from its request while the job lives (and in a dead
    letter), else from its answer (``"echo: " + prompt``). A job that ended without an
    answer (failed, cancelled, expired) no longer keeps its request, so it is matched to
    its client by the job id the client got, or not at all."""
    with contextlib.suppress(Exception):
        if rec.get("req"):
            return str(orjson.loads(rec["req"])["prompt"])
        answer = str(orjson.loads(rec["result"])["response"])
        if answer.startswith("echo: "):
            return answer[len("echo: ") :]
    return None


def reconcile(run: Chaos) -> Verdict:
    snap = run.snapshot
    records: dict[str, dict[str, Any]] = snap["records"]
    by_prompt: dict[str, list[str]] = collections.defaultdict(list)
    for job_id, rec in records.items():
        prompt = _prompt_of(rec)
        if prompt is not None:
            by_prompt[prompt].append(job_id)
    v = Verdict()
    errors: dict[int, str] = {}
    final_state: dict[int, str] = {}
    ids_of: dict[int, str | None] = {}
    for job in run.jobs:
        v.clients[f"{job.mode}:{job.outcome}"] += 1
        if job.outcome not in ("answer", "pending"):
            errors[job.index] = _error_kind(job)
            v.client_errors[errors[job.index]] += 1
        ids = by_prompt.get(job.prompt, [])
        job_id = ids_of[job.index] = job.job_id or (ids[0] if ids else None)
        rec = records.get(job_id) if job_id else None
        accepted = job.job_id is not None or bool(ids)
        if not accepted:
            v.not_accepted += 1
            continue
        v.accepted += 1
        state = _text(rec["state"]) if rec else "(no record)"
        v.states[state] += 1
        final_state[job.index] = state
        case = {"index": job.index, "job": job_id, "mode": job.mode, "state": state}
        if len(ids) > 1:
            v.answered_twice.append({**case, "why": f"{len(ids)} job records for one request"})
        if rec is None or state not in FINAL:
            why = "no record" if rec is None else f"still {state} at the end"
            v.lost.append({**case, "why": why})
        elif job.outcome == "hung":
            v.lost.append({**case, "why": f"client never answered (record {state})"})
        # What the client got.
        if job.done_lines > 1 or (job.done_lines and job.error_lines):
            v.answered_twice.append(
                {**case, "why": f"client got {job.done_lines} done + {job.error_lines} error"}
            )
        elif job.outcome == "answer" and job.text != job.expected:
            twice = job.text.count(job.expected) > 1 or len(job.text) > len(job.expected)
            target = v.answered_twice if twice else v.wrong
            target.append({**case, "why": f"client text {job.text!r}"})
        elif job.text and not job.expected.startswith(job.text):
            v.wrong.append({**case, "why": f"partial text not a prefix: {job.text!r}"})
        # What the record says, and whether it agrees with the client.
        if rec is not None and state == "done":
            result = orjson.loads(rec.get("result") or b"{}")
            if result.get("response") != job.expected:
                v.wrong.append({**case, "why": f"record result {result.get('response')!r}"})
        if job.outcome == "answer" and rec is not None and state != "done":
            v.wrong.append({**case, "why": f"client got the answer but the record is {state}"})
        if job.outcome in ("error", "http_error") and state == "done" and job.status != 499:
            v.wrong.append({**case, "why": f"client got {job.status} {job.error!r}, record done"})
    known = {p for p in by_prompt}.difference(j.prompt for j in run.jobs)
    for prompt in known:
        v.lost.append({"job": by_prompt[prompt][0], "why": "a record no client asked for"})
    stats = snap["stats"]
    settled = sum(stats.get(k, 0) for k in ("done", "failed", "cancelled", "expired", "dead"))
    settled += stats.get("orphaned", 0)
    final_records = sum(1 for r in records.values() if _text(r.get("state")) in FINAL)
    v.settle_check = {"settlements_counted": settled, "final_records": final_records}
    # Time from enqueue to the final state: how long recoveries kept jobs waiting.
    spans = []
    for job_id, rec in records.items():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            spans.append((float(rec["finished"]) - float(rec["created"]), job_id))
    spans.sort()
    if spans:
        pick = lambda q: round(spans[min(len(spans) - 1, int(q * len(spans)))][0], 3)  # noqa: E731
        v.latency = {"p50_s": pick(0.5), "p99_s": pick(0.99), "max_s": round(spans[-1][0], 3)}
        mode = {j.job_id: j.mode for j in run.jobs if j.job_id}
        for span, job_id in spans[-3:][::-1]:
            state = _text(records[job_id].get("state"))
            why = f"took {span:.1f}s from enqueue to {state}"
            v.slowest.append({"job": job_id, "mode": mode.get(job_id, "?"), "why": why})
    if settled > final_records:
        v.answered_twice.append(
            {"job": None, "why": f"{settled} settlements counted for {final_records} final jobs"}
        )
    _judge_faults(run, v, errors, final_state, ids_of)
    return v


def _judge_faults(
    run: Chaos,
    v: Verdict,
    errors: dict[int, str],
    final_state: dict[int, str],
    ids_of: dict[int, str | None],
) -> None:
    """Ran twice, from the fakes' counters, and what each disruption did to the jobs it hit."""
    bad: dict[int, set[str]] = collections.defaultdict(set)
    for label, cases in (("lost", v.lost), ("answered_twice", v.answered_twice),
                         ("wrong", v.wrong)):  # fmt: skip
        for case in cases:
            if case.get("index") is not None:
                bad[case["index"]].add(label)
    runs = run.snapshot["runs"]
    views = [
        fault_report.JobView(
            j.index, ids_of.get(j.index), j.mode, j.sent_at, j.ended_at or run.now(),
            j.first_chunk_at, runs.get(j.prompt, []),
        )
        for j in run.jobs
    ]  # fmt: skip
    report = fault_report.build(
        views, run.disruptions, run.injected, run.enabled, bad, errors, final_state
    )
    v.faults = report
    v.ran_twice = [
        {**case, "state": final_state.get(case["index"], "?")}
        for case in report.ran_twice["target"]
    ]
    v.not_injected = [kind for kind in run.enabled if not run.injected.get(kind)]


def _error_kind(job: ClientJob) -> str:
    text = (job.error or "").lower()
    if job.outcome in ("conn_lost", "not_sent", "hung", "truncated", "garbled"):
        killed = " (gateway killed)" if text.startswith("(gateway killed)") else ""
        return f"{job.outcome}{killed}"
    for needle, kind in (
        ("orphan", "orphaned"),
        ("gave up", "dead-lettered"),
        ("after part of the answer", "node died mid-stream"),
        ("stopped in the middle", "node stopped mid-stream"),
        ("queue is unavailable", "redis unavailable (503)"),
        ("oom", "redis refused a write (OOM)"),
        ("bad gateway", "a proxy's 502 page"),
        ("not json", "garbage from the node"),
        ("before it was done", "node stream ended before done"),
        ("dropped the connection", "node dropped the connection"),
        ("not found", "model not found (404)"),
        ("timed out", "timed out"),
        ("expired", "expired"),
        ("cancel", "cancelled"),
    ):
        if needle in text:
            return kind
    return f"{job.outcome} {job.status}: {text[:60]}"


# -- evidence for each bad job -------------------------------------------------------------


def explain(run: Chaos, case: dict[str, Any]) -> list[str]:
    job_id = case.get("job")
    lines = [f"- job {job_id} ({case.get('mode', '?')}): {case['why']}"]
    if case.get("index") is not None:
        job = run.jobs[case["index"]]
        lines.append(
            f"    client #{job.index}: {job.mode} p{job.priority}, sent t={job.sent_at:.2f}s "
            f"(gateway #{job.gateway_gen}), ended t={job.ended_at:.2f}s, outcome {job.outcome}, "
            f"status {job.status}, id {'from the gateway' if job.job_id else 'unknown'}, "
            f"{len(job.text)} chars, {job.done_lines} done line(s), polled "
            f"{job.polled_state} ({job.poll_timeouts} unanswered GETs), error {job.error!r}"
        )
    if not job_id:
        return lines
    rec = run.snapshot["records"].get(job_id)
    if rec:
        t = lambda name: _rel(rec.get(name), run.t0)  # noqa: E731
        lines.append(
            f"    record: state={_text(rec.get('state'))} node={_text(rec.get('node'))} "
            f"attempts={_text(rec.get('attempts'))} entry={_text(rec.get('entry'))} "
            f"created={t('created')} started={t('started')} finished={t('finished')} "
            f"requeued={t('requeued')} error={_text(rec.get('error'))!r}"
        )
        for line in _text(rec.get("history") or b"").splitlines():
            lines.append(f"    history: {line}")
        prompt = _prompt_of(rec) or ""
        for r in run.snapshot["runs"].get(prompt, []):
            lines.append(
                f"    fake {r.node}: started at {_times(r.started_at)}, completed at "
                f"{_times(r.completed_at)}, spoiled at {_times(r.garbage_at)}"
            )
        node = _text(rec.get("node"))
        if node and _text(rec.get("state")) == "running":
            now_running = (run.snapshot["nodes"].get(node) or {}).get("running", [])
            pending = run.snapshot["pending"].get(node, [])
            lines.append(
                f"    node {node} now runs {len(now_running)} job(s), this one "
                f"{'among them' if job_id in now_running else 'NOT among them'}; its entry "
                f"{'is' if _text(rec.get('entry')) in pending else 'is not'} pending under {node}"
            )
            started = float(_text(rec.get("started")) or 0) - run.t0
            mine = [e for e in run.events if e.get("node") == node and e["t"] >= started]
            kill = next((e for e in mine if e["kind"] == "SIGKILL worker"), None)
            back = next((e for e in mine if e["kind"] == "worker restarted"), None)
            if kill is None:
                lines.append(f"    {node} was not killed after the job started there")
            else:
                lines.append(
                    f"    {node} was SIGKILLed at t={kill['t']}s holding {kill['held']} job(s); "
                    f"restarted after {kill['restart_in']}"
                    + (
                        f", heartbeat gap {back['heartbeat_gap']} (node ttl {NODE_TTL:g}s)"
                        if back
                        else ""
                    )
                )
    if case.get("index") is not None:
        job = run.jobs[case["index"]]
        view = fault_report.JobView(
            job.index, job_id, job.mode, job.sent_at, job.ended_at or run.now(),
            job.first_chunk_at, run.snapshot["runs"].get(job.prompt, []),
        )  # fmt: skip
        for d in run.disruptions:
            at = fault_report.hit_time(d, view)
            if at is not None:
                where = f" on {d.node}" if d.node else ""
                lines.append(
                    f"    hit by {d.kind}{where} at t={at:.2f}s (it began t={d.start:.2f}s)"
                )
        if job.first_chunk_at is not None:
            lines.append(f"    first chunk reached the client at t={job.first_chunk_at:.2f}s")
    logged = []
    for path in sorted(run.log_dir.glob("*.log")):
        with contextlib.suppress(OSError):
            for raw in path.read_bytes().splitlines():
                if job_id.encode() in raw:
                    logged.append(f"    {path.stem}: {raw.decode(errors='replace')[:220]}")
    cause = _likely_cause(rec, logged, lines)
    if cause:
        lines.insert(1, f"    likely cause: {cause}")
    return lines + logged


def _times(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}s" for t in times) + "]" if times else "-"


def _likely_cause(rec: dict[str, Any] | None, logged: list[str], found: list[str]) -> str:
    if rec is None or _text(rec.get("state")) != "running":
        return ""
    node = _text(rec.get("node"))
    if any(f"worker-{node}:" in line and "crashed the runner" in line for line in logged):
        return (
            f"the runner task on {node} died on an exception it does not handle (see the "
            f"traceback in worker-{node}.log); nothing settled or handed back the job, and "
            f"{node} kept heartbeating, so the scheduler never took it back"
        )
    if any("was SIGKILLed" in line for line in found):
        return (
            f"the job was held by a SIGKILLed process of {node}; {node} came back under the "
            "same id before the scheduler declared it dead, so nobody took back the stream "
            "entries the old process had claimed"
        )
    return ""


# -- entry point -----------------------------------------------------------------------------


def _http_ok(url: str) -> bytes | None:
    try:
        with httpx.Client(timeout=2.0) as http:
            resp = http.get(url)
            return resp.content if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def _count_nodes(r: Redis, wanted: int) -> bool:
    return int(await r.zcard(keys.NODES)) >= wanted


def _request(job: ClientJob, *, stream: bool) -> dict[str, Any]:
    """The generate body of ``job``. ``num_predict`` is the answer's natural length: the
    fake treats ``num_predict`` as the exact length (it cycles the words to fill it), so
    a cap the degradation levels put on a request that names none (as the chaos load
    raises the level) would otherwise lengthen the answer a real model ends at its
    natural stop."""
    natural = len(f"echo: {job.prompt}".split())
    return {
        "model": MODEL,
        "prompt": job.prompt,
        "stream": stream,
        "options": {"num_predict": natural},
    }


def _error_text(raw: bytes) -> str:
    try:
        return str(orjson.loads(raw).get("error"))
    except (orjson.JSONDecodeError, AttributeError):
        return raw[:200].decode(errors="replace")


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _rel(value: Any, t0: float) -> str:
    text = _text(value)
    try:
        return f"{float(text) - t0:.2f}s"
    except ValueError:
        return "-"


def summarize(run: Chaos, v: Verdict, wall: float) -> tuple[list[str], dict[str, Any]]:
    snap = run.snapshot
    assert v.faults is not None
    injected = ", ".join(f"{k} x{run.injected.get(k, 0)}" for k in run.enabled) or "none"
    spells = [spell for spell in run.registry.finish(run.now()) if spell[2] - spell[1] >= 1.0]
    out = [
        "",
        "== chaos result ==",
        f"jobs: {len(run.jobs)} submitted, {v.accepted} accepted, {v.not_accepted} not accepted "
        f"(refused before enqueue); wall {wall:.1f}s",
        f"disruptions injected: {injected}",
        *[f"  {line}" for line in _fault_details(run)],
        "unexpected exits (restarted): "
        + (", ".join(f"{k} x{n}" for k, n in sorted(run.crashes.items())) or "none"),
        "final states: " + ", ".join(f"{k}={n}" for k, n in sorted(v.states.items())),
        "clients: " + ", ".join(f"{k}={n}" for k, n in sorted(v.clients.items())),
        "client errors by kind: "
        + (", ".join(f"{k}={n}" for k, n in v.client_errors.most_common()) or "none"),
        *v.faults.lines(),
        f"stats: {snap['stats']}",
        f"settlement check: {v.settle_check}; retry inbox {snap['retry_inbox']}, "
        f"RQ scheduled {snap['rq_scheduled']}, pending entries "
        f"{ {k: len(x) for k, x in snap['pending'].items()} }",
        "nodes that looked dead while their worker ran (heartbeat older than the node TTL, "
        "spells of 1 s or more): "
        + (", ".join(f"{n} t={a:.1f}-{b:.1f}s" for n, a, b in spells) or "none"),
        f"GET /jobs/{{id}} unanswered for 15 s: {sum(j.poll_timeouts for j in run.jobs)}",
        f"enqueue to final state: {v.latency}",
        f"logs: {run.log_dir}",
    ]
    if v.not_injected:
        out.append(f"NOT INJECTED (enabled, but it never happened): {', '.join(v.not_injected)}")
    allowed = v.faults.ran_twice["streamed"] + v.faults.ran_twice["worker_gone"]
    for title, cases in (
        ("LOST", v.lost),
        ("ANSWERED TWICE", v.answered_twice),
        ("WRONG", v.wrong),
        ("RAN TWICE (not streamed when hit)", v.ran_twice),
        ("ran twice, allowed", allowed),
        ("garbage, not recovered (for information)", v.faults.garbage_unrecovered),
        ("slowest (for information)", v.slowest),
    ):
        if cases:
            out.append(f"-- {title}: {len(cases)} --")
            for case in cases[:12]:
                out.extend(explain(run, case))
            if len(cases) > 12:
                out.append(f"  ... and {len(cases) - 12} more (see --json)")
    counts = " ".join(f"{s}={v.states.get(s, 0)}" for s in ("done", "failed", "cancelled",
                                                             "expired", "dead"))  # fmt: skip
    out.append(
        f"lost={len(v.lost)} answered_twice={len(v.answered_twice)} ran_twice={len(v.ran_twice)} "
        f"wrong={len(v.wrong)} ran_twice_allowed={len(allowed)} "
        f"not_injected={len(v.not_injected)} {counts} "
        f"accepted={v.accepted} not_accepted={v.not_accepted}"
    )
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": run.seed,
        "profile": asdict(run.p),
        "enabled": run.enabled,
        "wall_s": round(wall, 1),
        "injected": {k: run.injected.get(k, 0) for k in run.enabled},
        "not_injected": v.not_injected,
        "disruptions": [asdict(d) for d in run.disruptions],
        "unexpected_exits": dict(run.crashes),
        "looked_dead": [{"node": n, "from": a, "to": b} for n, a, b in spells],
        "t0": datetime.fromtimestamp(run.t0, UTC).isoformat(timespec="milliseconds"),
        "events": run.events,
        "states": dict(v.states),
        "clients": dict(v.clients),
        "client_errors": dict(v.client_errors),
        "accepted": v.accepted,
        "not_accepted": v.not_accepted,
        "lost": v.lost,
        "answered_twice": v.answered_twice,
        "wrong": v.wrong,
        **v.faults.as_dict(),
        "latency": v.latency,
        "slowest": v.slowest,
        "stats": snap["stats"],
        "settle_check": v.settle_check,
        "log_dir": str(run.log_dir),
        "jobs": [asdict(j) for j in run.jobs],
    }
    return out, report


def _fault_details(run: Chaos) -> list[str]:
    """One line per one-off disruption: when, where, and what it did."""
    lines = []
    for d in run.disruptions:
        if d.kind in ("worker_kill", "clock_skew"):
            continue  # many, and in the event log
        where = f" on {d.node}" if d.node else ""
        held = f", caught {len(d.jobs)} job(s)" if d.jobs is not None else ""
        extra = "".join(f", {k} {v}" for k, v in d.detail.items())
        lines.append(f"{d.kind}{where}: t={d.start:.1f}-{d.end:.1f}s{held}{extra}")
    skews = collections.Counter((d.node, d.detail.get("offset")) for d in run.disruptions
                                if d.kind == "clock_skew")  # fmt: skip
    if skews:
        lines.append(
            "clock_skew (CORRAL_CLOCK_OFFSET added to the worker's own clock): "
            + ", ".join(f"{node} {offset}s x{n} process(es)" for (node, offset), n in skews.items())
        )
    return lines


async def main_async(args: argparse.Namespace, run: Chaos) -> int:
    started = time.monotonic()
    run.hard_deadline = started + run.p.limit_s
    await run.start_fleet()
    run.client_deadline = run.hard_deadline - 8.0  # keeps time to reconcile and tear down
    chaos = asyncio.create_task(run.chaos())
    supervisor = asyncio.create_task(run.supervise())
    registry = asyncio.create_task(run.registry.watch())
    try:
        await run.submit_all()
    finally:
        run.submitting = False
        run.submissions_over.set()
        # Bounded: a fault still running at the hard deadline is stopped, not waited for.
        await asyncio.wait([chaos], timeout=max(1.0, run.hard_deadline - time.monotonic()))
        # redis-py can swallow a cancellation that lands mid-command, so cancel until done.
        for task in (chaos, supervisor, registry):
            await cancel_and_wait(task)
    if not chaos.cancelled() and chaos.exception():
        raise chaos.exception()  # type: ignore[misc]
    verdict = reconcile(run)
    lines, run.report = summarize(run, verdict, time.monotonic() - started)
    print("\n".join(lines), flush=True)
    return 1 if verdict.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="jobs to submit (default 2000)")
    parser.add_argument("--duration-limit", type=float, default=None, help="seconds, all in")
    parser.add_argument("--short", action="store_true", help="a CI-sized run (about 2 minutes)")
    parser.add_argument(
        "--faults",
        default="all",
        help="disruptions to inject: all (default), kills, faults, none, or a comma-separated "
        f"list of {', '.join(DISRUPTIONS)}",
    )
    parser.add_argument("--without", default="", help="disruptions to leave out (same names)")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--json", default=None, help="write the full report here")
    args = parser.parse_args(argv)
    try:
        enabled = parse_names(args.faults) - parse_names(args.without)
    except ValueError as exc:
        parser.error(str(exc))
    base = SHORT if args.short else FULL
    profile = dataclasses.replace(base)
    if args.jobs is not None:
        profile.jobs = args.jobs
    if args.duration_limit is not None:
        profile.limit_s = args.duration_limit
    seed = args.seed if args.seed is not None else random.randrange(1, 1_000_000)
    log_dir = Path(tempfile.mkdtemp(prefix="corral-chaos-"))
    print(f"chaos: seed {seed}, {profile.jobs} jobs, logs in {log_dir}", flush=True)
    print(f"chaos: disruptions: {', '.join(d for d in DISRUPTIONS if d in enabled)}", flush=True)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    run = Chaos(profile, seed, log_dir, enabled)
    try:
        code = asyncio.run(main_async(args, run))
        if args.json:
            Path(args.json).write_bytes(orjson.dumps(run.report, option=orjson.OPT_INDENT_2))
        return code
    except KeyboardInterrupt:
        print(f"chaos: interrupted; logs in {log_dir}", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"chaos: error: {exc!r}; logs in {log_dir}", file=sys.stderr)
        raise
    finally:
        with contextlib.suppress(BaseException):
            run.stop_fleet()
        kill_all_children()


if __name__ == "__main__":
    raise SystemExit(main())
