"""Start a Corral fleet as separate processes, as in production, and tear it down.

Redis (``corral.tooling.redis_proc.RedisProcess``, never the one on 6379), fake Ollama nodes,
one worker per node, a gateway and a scheduler each run as their own ``corral ...``
subprocess in their own session. Readiness is polled with a deadline: a fake answers
``/api/version``, a worker's heartbeat is in Redis, the gateway's ``/healthz`` answers
and counts the nodes. ``stop()`` sends SIGTERM, waits, then SIGKILLs what is left
(``corral.children``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import shlex
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import orjson
import psutil
import redis as redis_sync

from corral import keys
from corral.children import Child, stop_all
from corral.tooling.redis_proc import RedisProcess, free_port

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
START_DEADLINE = 30.0


_LIVE: set[Proc] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.kill()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # run_all sends SIGTERM when a benchmark overruns: unwind so `with Fleet` cleans up.
    raise SystemExit(128 + signum)


atexit.register(_kill_leftovers)
signal.signal(signal.SIGTERM, _exit_on_sigterm)


def raise_nofile(wanted: int = 65536) -> int:
    """Raise this process's open-file limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_env() -> dict[str, str]:
    # Settings come from our flags only: drop CORRAL_* / OLLAMA_* from the caller's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "OLLAMA_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _http_ok(url: str, timeout: float = 1.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bytes(resp.read()) if resp.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


class Proc(Child):
    """One child process of the fleet (its own session, its log file), with what the
    benchmarks read of it: CPU, memory, the problems it logged."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = log_dir / f"{name}.log"
        super().__init__(name, argv, log=self.log_file, env=_child_env())
        self.ps = psutil.Process(self.pid)
        _LIVE.add(self)

    def log_problems(self, limit: int = 5) -> list[tuple[str, int]]:
        """The most frequent WARNING/ERROR/Traceback lines of the log, timestamps removed."""
        counts: dict[str, int] = {}
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            for level in (" ERROR ", " WARNING ", " CRITICAL "):
                if level in line:
                    message = level.strip() + " " + line.split(level, 1)[1].strip()
                    counts[message[:240]] = counts.get(message[:240], 0) + 1
            if line.startswith("Traceback"):
                counts["Traceback"] = counts.get("Traceback", 0) + 1
        return sorted(counts.items(), key=lambda kv: -kv[1])[:limit]

    def cpu_seconds(self) -> float:
        """User + system CPU of the process (and of its children, e.g. uvicorn workers)."""
        try:
            total = sum(self.ps.cpu_times()[:2])
            for child in self.ps.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += sum(child.cpu_times()[:2])
            return float(total)
        except psutil.Error:
            return 0.0

    def rss(self) -> int:
        try:
            return int(self.ps.memory_info().rss)
        except psutil.Error:
            return 0

    def kill(self) -> None:
        """SIGKILL it and its group, as a crash would."""
        super().kill()
        _LIVE.discard(self)

    def wait(self, timeout: float) -> None:
        """After ``terminate()``: up to ``timeout`` seconds to exit, then SIGKILL."""
        self.stop(timeout)


def corral_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral.cli", *args]


FAKE_COMMAND_ENV = "CORRAL_BENCH_FAKE"
"""A command line that runs ``corral`` for the fake Ollama nodes in place of this checkout's
own (say ``OTHER/.venv/bin/python -P -m corral.cli``). A comparison of two versions of
Corral runs both against the same fake this way, so that what the fake itself costs on a
shared machine is not counted for or against either version."""


def fake_argv(*args: str) -> list[str]:
    command = os.environ.get(FAKE_COMMAND_ENV, "").strip()
    return [*shlex.split(command), *args] if command else corral_argv(*args)


@dataclass
class Node:
    node_id: str
    fake: Proc
    fake_url: str
    worker: Proc | None = None

    def kill(self) -> None:
        """SIGKILL the worker and its fake Ollama (a node dying)."""
        if self.worker is not None:
            self.worker.kill()
        self.fake.kill()


@dataclass
class FakeSpec:
    """Flags for one fake Ollama node."""

    models: list[str] = field(default_factory=lambda: ["bench:latest"])
    num_parallel: int = 1
    max_loaded_models: int = 3
    load_delay: float = 0.0
    token_rate: float = 0.0
    preload: list[str] = field(default_factory=list)
    max_queue: int = 512
    extra: list[str] = field(default_factory=list)

    def argv(self, port: int) -> list[str]:
        out = [
            "fake-ollama",
            "--port", str(port),
            "--models", ",".join(self.models),
            "--num-parallel", str(self.num_parallel),
            "--max-loaded-models", str(self.max_loaded_models),
            "--load-delay", str(self.load_delay),
            "--token-rate", str(self.token_rate),
            "--max-queue", str(self.max_queue),
        ]  # fmt: skip
        if self.preload:
            out += ["--preload", ",".join(self.preload)]
        return out + self.extra


class Fleet:
    """Redis + fakes + workers + gateway + scheduler, each its own process.

    ``common`` flags go to the gateway, every worker and the scheduler (e.g. a short
    ``--node-ttl``); ``log_level`` defaults to WARNING so per-job INFO lines do not cost
    CPU in the measurements.
    """

    def __init__(
        self,
        name: str,
        *,
        log_level: str = "WARNING",
        common: list[str] | None = None,
        redis_args: list[str] | None = None,
    ) -> None:
        self.name = name
        self.log_dir = OUT_DIR / "logs" / name
        shutil.rmtree(self.log_dir, ignore_errors=True)  # logs of this run only
        self.log_level = log_level
        self.common = list(common or [])
        self.redis_args = list(redis_args or [])
        self.redis: RedisProcess | None = None
        self.nodes: list[Node] = []
        self.gateway: Proc | None = None
        self.gateway_url = ""
        self.scheduler: Proc | None = None
        self.extra: list[Proc] = []

    # -- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    def start_redis(self) -> str:
        # No persistence, a big client backlog: a benchmark Redis, not a durable one.
        self.redis = RedisProcess(
            extra_args=["--maxclients", "20000", "--tcp-backlog", "4096", *self.redis_args]
        ).start()
        return self.redis.url

    def redis_client(self) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(self.redis_url)

    def start_fake(self, name: str, spec: FakeSpec) -> tuple[Proc, str]:
        port = free_port()
        proc = Proc(f"fake-{name}", fake_argv(*spec.argv(port)), self.log_dir)
        url = f"http://127.0.0.1:{port}"
        proc.wait_until(lambda: _http_ok(url + "/api/version"), START_DEADLINE, f"fake {name}")
        return proc, url

    def add_node(
        self,
        node_id: str,
        spec: FakeSpec,
        *,
        worker_args: list[str] | None = None,
        with_worker: bool = True,
        wait: bool = True,
    ) -> Node:
        fake, url = self.start_fake(node_id, spec)
        node = Node(node_id, fake, url)
        self.nodes.append(node)
        if with_worker:
            self.start_worker(node, spec.num_parallel, worker_args or [], wait=wait)
        return node

    def start_worker(
        self, node: Node, slots: int, args: list[str], *, wait: bool = True, tag: str = ""
    ) -> Proc:
        argv = corral_argv(
            "worker",
            "--redis-url", self.redis_url,
            "--ollama-url", node.fake_url,
            "--node-id", node.node_id,
            "--num-parallel", str(slots),
            "--log-level", self.log_level,
            "--drain-timeout", "2",
            *self.common,
            *args,
        )  # fmt: skip
        node.worker = Proc(f"worker-{node.node_id}{tag}", argv, self.log_dir)
        if wait:
            self.wait_worker(node)
        return node.worker

    def wait_worker(self, node: Node) -> None:
        client = self.redis_client()
        worker = node.worker
        assert worker is not None
        try:
            worker.wait_until(
                lambda: client.zscore(keys.NODES, node.node_id) is not None,
                START_DEADLINE,
                f"worker {node.node_id}",
            )
        finally:
            client.close()

    def start_gateway(self, args: list[str] | None = None, *, expect_nodes: int = 0) -> str:
        port = free_port()
        argv = corral_argv(
            "gateway",
            "--redis-url", self.redis_url,
            "--port", str(port),
            "--log-level", self.log_level,
            *self.common,
            *(args or []),
        )  # fmt: skip
        self.gateway = Proc("gateway", argv, self.log_dir)
        self.gateway_url = f"http://127.0.0.1:{port}"
        gw = self.gateway

        def ready() -> bool:
            raw = _http_ok(self.gateway_url + "/healthz")
            return raw is not None and int(orjson.loads(raw).get("nodes", 0)) >= expect_nodes

        gw.wait_until(ready, START_DEADLINE, "gateway")
        return self.gateway_url

    def wait_gateway_nodes(self, count: int) -> None:
        assert self.gateway is not None
        gw = self.gateway

        def ready() -> bool:
            raw = _http_ok(self.gateway_url + "/healthz")
            return raw is not None and int(orjson.loads(raw).get("nodes", -1)) == count

        gw.wait_until(ready, START_DEADLINE, f"gateway to see {count} node(s)")

    def start_scheduler(self, args: list[str] | None = None) -> Proc:
        argv = corral_argv(
            "scheduler",
            "--redis-url", self.redis_url,
            "--log-level", self.log_level,
            *self.common,
            *(args or []),
        )  # fmt: skip
        self.scheduler = Proc("scheduler", argv, self.log_dir)
        time.sleep(0.3)
        self.scheduler.check_alive()
        return self.scheduler

    def spawn(self, name: str, argv: list[str]) -> Proc:
        """Any other helper process (push balancer, heartbeat simulator); stopped with us."""
        proc = Proc(name, argv, self.log_dir)
        self.extra.append(proc)
        return proc

    def processes(self) -> dict[str, Proc]:
        out: dict[str, Proc] = {}
        if self.gateway is not None:
            out["gateway"] = self.gateway
        for node in self.nodes:
            if node.worker is not None:
                out[node.worker.name] = node.worker
            out[node.fake.name] = node.fake
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler
        for proc in self.extra:
            out[proc.name] = proc
        return out

    def redis_pid(self) -> int | None:
        return self.redis.pid if self.redis is not None else None

    def stop(self) -> None:
        procs: list[Proc] = []
        if self.gateway is not None:
            procs.append(self.gateway)
        procs += self.extra
        procs += [n.worker for n in self.nodes if n.worker is not None]
        if self.scheduler is not None:
            procs.append(self.scheduler)
        stop_all(procs, 10)
        stop_all([n.fake for n in self.nodes], 10)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


class CpuSampler:
    """CPU seconds used by each process between ``start()`` and ``stop()``."""

    def __init__(self, procs: dict[str, Proc], redis_pid: int | None) -> None:
        self.procs = procs
        self.redis = psutil.Process(redis_pid) if redis_pid else None
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        out = {name: proc.cpu_seconds() for name, proc in self.procs.items()}
        if self.redis is not None:
            with contextlib.suppress(psutil.Error):
                out["redis"] = float(sum(self.redis.cpu_times()[:2]))
        return out

    @staticmethod
    def machine_busy() -> float:
        """CPU seconds the whole machine has been busy (all processes, all cores)."""
        t = psutil.cpu_times()
        return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))

    def start(self) -> None:
        self.before = self._read()
        self.machine_before = self.machine_busy()
        self.t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        after = self._read()
        self.used = {k: after[k] - self.before.get(k, 0.0) for k in after}
        self.machine_cores = (self.machine_busy() - self.machine_before) / max(
            1e-9, time.monotonic() - self.t0
        )
        return self.used
