"""``corral demo``: start a whole fleet on this machine and send it real Ollama requests.

Everything runs locally and needs nothing but this package: a Redis (``redis-server``
when installed, else the embedded fakeredis server), two simulated Ollama nodes of
different speeds, a worker for each, a scheduler and a gateway, each its own process
as in production. The requests go through the official ``ollama`` Python client, the
way an application would send them; the demo prints what happened and which node
served what, then stops everything. With ``--keep`` the fleet stays up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama
from ollama import ProcessResponse

from corral.children import Child, stop_all
from corral.keys import FINAL_STATES, JobState
from corral.tooling.redis_proc import EmbeddedRedis, RedisProcess, free_port, start_best_redis

HOST = "127.0.0.1"
LOAD_DELAY = 0.3
"""Seconds a fake node takes to load a model: enough to see in the timings, no more."""
READY_TIMEOUT = 45.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
LOG_TAIL_LINES = 12
HEARTBEAT_LAG = 6.0
"""Longest a heartbeat-fed answer (``ps()``, ``/nodes``) may trail the nodes: a worker
heartbeat (2 s) plus a gateway fleet refresh (1 s), with room to spare."""
JOB_HEADER = "x-corral-job-id"
PRIORITY_HEADER = "X-Corral-Priority"

GENERATE_MODEL = "llama3"
CHAT_MODEL = "qwen2:0.5b"
EMBED_MODEL = "nomic-embed-text"
BURST_PRIORITIES = (9, 0, 5, 7, 1, 3, 8, 2)
BURST_PROMPT = "name three things a job queue needs to stay fair when every node is busy"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    node_id: str
    token_rate: float
    slots: int


ProcessModel = ProcessResponse.Model

NODES = (NodeSpec("node-fast", 40.0, 2), NodeSpec("node-slow", 15.0, 1))


class StepFailed(Exception):
    """A demo request did not get the answer it should have."""


class FleetDown(Exception):
    """A child process exited, or the fleet never became ready."""


# ------------------------------------------------------------------------ processes


def child_env(redis_url: str) -> dict[str, str]:
    """This environment minus any CORRAL_* settings, plus the demo's Redis.

    A user's own CORRAL_* variables (API keys, a production Redis URL ...) must not
    leak into the demo's fleet, or its requests would be refused or land elsewhere.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_REDIS_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file before a crash, not after
    return env


def spawn(name: str, args: list[str], logdir: Path, env: dict[str, str]) -> Child:
    # Its own session (Child's default): a Ctrl-C in the terminal reaches only the demo,
    # which then stops the fleet in order (a worker hit twice would skip its graceful drain).
    argv = [sys.executable, "-m", "corral.cli", *args]
    return Child(name, argv, log=logdir / f"{name}.log", env=env)


# ---------------------------------------------------------------------------- fleet


@dataclass
class DemoFleet:
    """Redis plus the fleet's processes, started and stopped in dependency order."""

    logdir: Path
    gateway_port: int
    embedded_redis: bool = False
    redis: RedisProcess | EmbeddedRedis | None = None
    nodes: list[Child] = field(default_factory=list)
    daemons: list[Child] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.gateway_port}"

    @property
    def redis_url(self) -> str:
        """The Redis URL the fleet's processes get (the embedded one's asks for RESP2)."""
        if self.redis is None:
            return ""
        return self.redis.url

    @property
    def children(self) -> list[Child]:
        return [*self.nodes, *self.daemons]

    def start(self) -> None:
        self.redis = start_best_redis(prefer_real=not self.embedded_redis)
        print(f"  redis      {describe_redis(self.redis)}")
        env = child_env(self.redis_url)
        for spec in NODES:
            self._start_node(spec, env)
        self.daemons.append(spawn("scheduler", ["scheduler"], self.logdir, env))
        print("  scheduler  reclaims jobs of dead nodes, retries, dead letters")
        gateway_args = ["gateway", "--host", HOST, "--port", str(self.gateway_port)]
        self.daemons.append(spawn("gateway", gateway_args, self.logdir, env))
        print(f"  gateway    {self.gateway_url}  (Ollama API, POST /jobs, /status, /metrics)")

    def _start_node(self, spec: NodeSpec, env: dict[str, str]) -> None:
        port = free_port()
        fake_args = [
            "fake-ollama",
            *("--host", HOST, "--port", str(port)),
            *("--token-rate", f"{spec.token_rate:g}", "--num-parallel", str(spec.slots)),
            *("--load-delay", f"{LOAD_DELAY:g}"),
        ]
        self.nodes.append(spawn(f"ollama-{spec.node_id}", fake_args, self.logdir, env))
        worker_args = [
            "worker",
            *("--ollama-url", f"http://{HOST}:{port}", "--node-id", spec.node_id),
            *("--num-parallel", str(spec.slots)),
        ]
        self.daemons.append(spawn(f"worker-{spec.node_id}", worker_args, self.logdir, env))
        slots = f"{spec.slots} slot" + ("s" if spec.slots > 1 else "")
        print(
            f"  {spec.node_id:<10} fake Ollama on :{port} ({spec.token_rate:g} tokens/s, "
            f"{slots}, {LOAD_DELAY:g}s model loads) + its worker"
        )

    def check_alive(self) -> None:
        for child in self.children:
            code = child.returncode
            if code is not None:
                raise FleetDown(f"{child.name} exited with code {code}")

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Poll /healthz until the gateway sees every node; returns the health answer."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with httpx.Client(base_url=self.gateway_url, timeout=2.0) as http:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    health: dict[str, Any] = http.get("/healthz").json()
                except (httpx.HTTPError, ValueError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                else:
                    if health.get("nodes") == len(NODES):
                        return health
                    last = f"healthz: {health}"
                time.sleep(POLL_INTERVAL)
        raise FleetDown(f"the fleet was not ready within {timeout:g}s ({last})")

    def stop(self) -> None:
        """Gateway, workers and scheduler first (workers hand back jobs through Redis and
        need their Ollama while draining), then the nodes, then Redis."""
        try:
            stop_all(self.daemons, STOP_TIMEOUT)
            stop_all(self.nodes, STOP_TIMEOUT)
        except KeyboardInterrupt:
            print("  interrupted again: killing what is left")
            for child in self.children:
                child.kill()
        finally:
            if self.redis is not None:
                self.redis.stop()

    def print_logs(self) -> None:
        print(f"\nlogs of every process are in {self.logdir}")
        for child in self.children:
            print(f"--- {child.name} (last lines of {child.name}.log) ---")
            print(child.log_tail(LOG_TAIL_LINES) or "(empty log)")


def describe_redis(server: RedisProcess | EmbeddedRedis) -> str:
    if isinstance(server, RedisProcess):
        return f"redis-server (pid {server.pid}) at {server.url}"
    return (
        f"embedded Redis (fakeredis, inside this process) at {server.url}; "
        "install redis-server to use a real one"
    )


# ------------------------------------------------------------------------- requests


@dataclass(slots=True)
class BurstResult:
    priority: int
    job_id: str
    seconds: float
    job: dict[str, Any] = field(default_factory=dict)


def tracked_client(url: str) -> tuple[ollama.Client, list[str]]:
    """An official Ollama client on the gateway, and the job ids its responses carry.

    The ``ollama`` client hides response headers, so an httpx hook collects them.
    """
    ids: list[str] = []

    def remember(response: httpx.Response) -> None:
        if JOB_HEADER in response.headers:
            ids.append(response.headers[JOB_HEADER])

    client = ollama.Client(host=url, timeout=REQUEST_TIMEOUT, event_hooks={"response": [remember]})
    return client, ids


def tracked_async_client(url: str, priority: int) -> tuple[ollama.AsyncClient, list[str]]:
    """Like ``tracked_client``, async, and sending every request at ``priority``."""
    ids: list[str] = []

    async def remember(response: httpx.Response) -> None:
        if JOB_HEADER in response.headers:
            ids.append(response.headers[JOB_HEADER])

    client = ollama.AsyncClient(
        host=url,
        headers={PRIORITY_HEADER: str(priority)},
        timeout=REQUEST_TIMEOUT,
        event_hooks={"response": [remember]},
    )
    return client, ids


class Requests:
    """The demo's requests; each step prints what it saw and raises when it went wrong."""

    def __init__(
        self, url: str, http: httpx.Client, client: ollama.Client, job_ids: list[str]
    ) -> None:
        self.url = url
        self.http = http
        self.client = client
        self.job_ids = job_ids

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        response.raise_for_status()
        view: dict[str, Any] = response.json()
        return view

    def served_by(self, seen: int) -> str:
        """The node of the latest response's job, from its ``GET /jobs/{id}`` record;
        ``seen`` is how many job ids were collected before that request."""
        if len(self.job_ids) <= seen:
            raise StepFailed(f"the response had no {JOB_HEADER} header")
        job_id = self.job_ids[-1]
        return f"{self.job(job_id).get('node')} (job {job_id[:8]})"

    def generate(self) -> None:
        prompt = "Why is the sky blue?"
        print(f"      client.generate(model={GENERATE_MODEL!r}, prompt={prompt!r}, stream=False)")
        seen, started = len(self.job_ids), time.monotonic()
        reply = self.client.generate(model=GENERATE_MODEL, prompt=prompt, stream=False)
        took = time.monotonic() - started
        load = (reply.load_duration or 0) / 1e9
        print(f"      -> {reply.response!r}")
        print(
            f"      {reply.eval_count} tokens in {took:.2f}s (model load {load:.2f}s), "
            f"served by {self.served_by(seen)}"
        )
        if not (reply.response or "").startswith("echo:"):
            raise StepFailed(f"unexpected answer {reply.response!r}")

    def chat_stream(self) -> None:
        content = "Tell me how a request finds a free node, token by token"
        messages = [{"role": "user", "content": content}]
        print(f"      client.chat(model={CHAT_MODEL!r}, messages=[...], stream=True)")
        print("      -> ", end="", flush=True)
        seen, started = len(self.job_ids), time.monotonic()
        first = 0.0
        chunks = 0
        for part in self.client.chat(model=CHAT_MODEL, messages=messages, stream=True):
            if not first:
                first = time.monotonic() - started
            chunks += 1
            print(part.message.content or "", end="", flush=True)
        took = time.monotonic() - started
        print()
        print(
            f"      {chunks} chunks, first after {first:.2f}s, all in {took:.2f}s, "
            f"served by {self.served_by(seen)}"
        )
        if chunks < 2:
            raise StepFailed(f"expected a stream of chunks, got {chunks}")

    def embed(self) -> None:
        texts = ["a queue per model", "priorities from 0 to 9", "one endpoint for many nodes"]
        print(f"      client.embed(model={EMBED_MODEL!r}, input=[{len(texts)} texts])")
        seen, started = len(self.job_ids), time.monotonic()
        reply = self.client.embed(model=EMBED_MODEL, input=texts)
        took = time.monotonic() - started
        vectors = list(reply.embeddings)
        dims = len(vectors[0]) if vectors else 0
        print(
            f"      -> {len(vectors)} vectors of {dims} dimensions in {took:.2f}s, "
            f"served by {self.served_by(seen)}"
        )
        if len(vectors) != len(texts):
            raise StepFailed(f"{len(texts)} texts gave {len(vectors)} vectors")

    def list_models(self) -> None:
        models = self.client.list().models
        print("      client.list(): the union of what the nodes serve")
        for model in models:
            size = (model.size or 0) / 1e9
            params = model.details.parameter_size if model.details else "?"
            print(f"      -> {model.model!s:<26} {params!s:>8} params  {size:5.2f} GB")
        if not models:
            raise StepFailed("the fleet lists no models")

    def running_models(self) -> None:
        print("      client.ps(): models loaded on some node right now")
        started = time.monotonic()
        loaded = self._poll_ps(started + HEARTBEAT_LAG)
        for model in loaded:
            until = model.expires_at.strftime("%H:%M:%S") if model.expires_at else "?"
            print(f"      -> {model.model!s:<26} in memory until {until}")
        if not loaded:
            raise StepFailed(f"no model listed as loaded within {HEARTBEAT_LAG:g}s")

    def _poll_ps(self, deadline: float) -> list[ProcessModel]:
        """``ps()`` until it lists something: the gateway answers it from node heartbeats,
        which trail what the nodes did by up to a heartbeat and a fleet refresh."""
        while True:
            loaded = list(self.client.ps().models)
            if loaded or time.monotonic() >= deadline:
                return loaded
            time.sleep(POLL_INTERVAL)

    def burst(self) -> None:
        priorities = ", ".join(map(str, BURST_PRIORITIES))
        print(f"      {len(BURST_PRIORITIES)} concurrent client.generate() calls at once, with")
        print(
            f"      {PRIORITY_HEADER}: {priorities} (0 is the most urgent), "
            f"for the fleet's {sum(n.slots for n in NODES)} slots"
        )
        results = asyncio.run(self._burst())
        for result in results:
            result.job = self.job(result.job_id)
        results.sort(key=lambda r: float(r.job.get("started_at") or 0))
        print("      start  priority  node        waited   ran     total")
        for order, result in enumerate(results, 1):
            print("      " + burst_row(order, result))
        nodes = [str(r.job.get("node")) for r in results]
        print(
            "      jobs per node: " + ", ".join(f"{n} {nodes.count(n)}" for n in sorted(set(nodes)))
        )
        print("      " + queue_order(results, sum(n.slots for n in NODES)))

    async def _burst(self) -> list[BurstResult]:
        # Every client is built before any request starts: building one (an httpx client
        # with its TLS context) blocks the loop long enough to skew the others' timings.
        clients = [tracked_async_client(self.url, p) for p in BURST_PRIORITIES]
        async with contextlib.AsyncExitStack() as stack:
            for client, _ in clients:
                await stack.enter_async_context(client)
            # gather, not a TaskGroup: the first failure surfaces as itself, not in a group.
            return list(
                await asyncio.gather(
                    *(
                        self._one(priority, client, ids)
                        for priority, (client, ids) in zip(BURST_PRIORITIES, clients, strict=True)
                    )
                )
            )

    async def _one(self, priority: int, client: ollama.AsyncClient, ids: list[str]) -> BurstResult:
        started = time.monotonic()
        await client.generate(model=GENERATE_MODEL, prompt=BURST_PROMPT, stream=False)
        if not ids:
            raise StepFailed(f"the response had no {JOB_HEADER} header")
        return BurstResult(priority, ids[0], time.monotonic() - started)

    def unknown_model(self) -> None:
        print("      client.generate(model='no-such-model', prompt='hello')")
        try:
            self.client.generate(model="no-such-model", prompt="hello", stream=False)
        except ollama.ResponseError as exc:
            print(f"      -> ollama.ResponseError {exc.status_code}: {exc.error}")
            if exc.status_code != 404:
                raise StepFailed(f"expected 404, got {exc.status_code}") from exc
            return
        raise StepFailed("an unknown model was answered")

    def cached(self) -> None:
        body = {
            "model": GENERATE_MODEL,
            "prompt": "What is the capital of France?",
            "stream": False,
            "options": {"temperature": 0},
        }
        print(f"      POST /api/generate {json.dumps(body)}, twice")
        outcomes = []
        for _ in range(2):
            started = time.monotonic()
            response = self.http.post("/api/generate", json=body)
            took = (time.monotonic() - started) * 1000
            outcome = response.headers.get("x-corral-cache", "(none)")
            outcomes.append(outcome)
            print(f"      -> {response.status_code} X-Corral-Cache: {outcome} in {took:.1f} ms")
            if response.status_code != 200:
                raise StepFailed(f"expected 200, got {response.status_code}: {response.text}")
        if outcomes[1] != "hit":
            raise StepFailed(f"the repeated deterministic request was a {outcomes[1]}, not a hit")

    def background_job(self) -> None:
        body = {
            "kind": "generate",
            "request": {"model": GENERATE_MODEL, "prompt": "Summarise this run for me later"},
            "priority": 1,
            "wait": False,
        }
        shown = {**body, "request": {"model": GENERATE_MODEL, "prompt": "..."}}
        print(f"      POST /jobs {json.dumps(shown)}")
        started = time.monotonic()
        response = self.http.post("/jobs", json=body)
        accepted = response.json()
        print(f"      -> {response.status_code} {response.text}")
        if response.status_code != 202:
            raise StepFailed(f"expected 202 Accepted, got {response.status_code}")
        seen, view = self._poll_job(str(accepted["id"]), started)
        path = " -> ".join(f"{state} ({at:.2f}s)" for state, at in seen)
        print(f"      GET /jobs/{{id}} every {POLL_INTERVAL:g}s: {path}")
        result = view.get("result") or {}
        print(f"      served by {view.get('node')}: {result.get('response')!r}")
        if view.get("state") != JobState.DONE:
            raise StepFailed(f"the job ended {view.get('state')}: {view.get('error')}")

    def _poll_job(
        self, job_id: str, started: float
    ) -> tuple[list[tuple[str, float]], dict[str, Any]]:
        """Every state the job is seen in, with when it was first seen."""
        seen: list[tuple[str, float]] = []
        deadline = started + REQUEST_TIMEOUT
        while time.monotonic() < deadline:
            view = self.job(job_id)
            state = str(view.get("state"))
            if not seen or seen[-1][0] != state:
                seen.append((state, time.monotonic() - started))
            if state in FINAL_STATES:
                return seen, view
            time.sleep(POLL_INTERVAL)
        raise StepFailed(f"job {job_id} did not finish within {REQUEST_TIMEOUT:g}s")

    def nodes(self) -> None:
        print("      GET /nodes: each worker's last heartbeat, and the fleet's counters")
        answer = self._settled_nodes(time.monotonic() + HEARTBEAT_LAG)
        for node in answer.get("nodes", []):
            print("      -> " + node_line(node))
        stats = answer.get("stats", {})
        print("      counters: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
        if len(answer.get("nodes", [])) != len(NODES):
            raise StepFailed(f"expected {len(NODES)} nodes, /nodes lists {answer.get('nodes')}")

    def status(self) -> None:
        page = self.http.get("/status")
        page.raise_for_status()
        print(
            f"      GET /status: an HTML page of {len(page.content):,} bytes (open it in a browser)"
        )
        metrics = self.http.get("/metrics")
        metrics.raise_for_status()
        wanted = ("corral_job_events_total", "corral_node_up", "corral_queued_jobs")
        shown = [line for line in metrics.text.splitlines() if line.startswith(wanted)]
        print(f"      GET /metrics: {len(metrics.text.splitlines())} lines, among them")
        for line in shown[:8]:
            print(f"      -> {line}")
        if not any(line.startswith("corral_node_up") for line in shown):
            raise StepFailed("/metrics lists no node")

    def _settled_nodes(self, deadline: float) -> dict[str, Any]:
        """``/nodes`` once every heartbeat shows its node idle (or at the deadline).

        A heartbeat sent during the burst still reports busy slots until the next one;
        waiting for fresh ones shows the fleet as it is now that the work is done.
        """
        while True:
            response = self.http.get("/nodes")
            response.raise_for_status()
            answer: dict[str, Any] = response.json()
            idle = all(not n.get("slots_busy") for n in answer.get("nodes", []))
            if idle or time.monotonic() >= deadline:
                return answer
            time.sleep(POLL_INTERVAL)


def node_line(node: dict[str, Any]) -> str:
    age = time.time() - float(node.get("ts") or 0)
    loaded = ", ".join(str(m.get("name") or m.get("model")) for m in node.get("loaded", []))
    return (
        f"{node.get('node_id')!s:<10} {node.get('state')}, "
        f"{node.get('slots_busy')}/{node.get('slots_total')} slots busy, "
        f"loaded: {loaded or 'nothing'} (heartbeat {age:.1f}s old)"
    )


def burst_row(order: int, result: BurstResult) -> str:
    job = result.job
    created = float(job.get("created_at") or 0)
    started = float(job.get("started_at") or created)
    finished = float(job.get("finished_at") or started)
    return (
        f"{order:>5}  {result.priority:>8}  {job.get('node')!s:<10}  "
        f"{started - created:5.2f}s  {finished - started:5.2f}s  {result.seconds:5.2f}s"
    )


def queue_order(started: list[BurstResult], slots: int) -> str:
    """Say in which order the jobs that found every slot taken got one.

    The first ``slots`` jobs start at once, whatever their priority (nothing is
    preempted); the rest wait in the queue, which hands them out most urgent first.
    """
    waited = [r.priority for r in started[slots:]]
    order = " ".join(map(str, waited))
    first = f"the first {slots} took the free slots as they came; the {len(waited)} that waited"
    if waited == sorted(waited):
        return f"{first}\n      started most urgent first: {order}"
    return f"{first}\n      started in the order {order}"


# ---------------------------------------------------------------------------- steps

Step = tuple[str, Callable[[], None]]


def steps_of(requests: Requests) -> list[Step]:
    return [
        ("generate, not streamed", requests.generate),
        ("chat, streamed token by token", requests.chat_stream),
        ("embed a list of texts", requests.embed),
        ("list the fleet's models", requests.list_models),
        ("models loaded right now", requests.running_models),
        # Before the burst: the burst raises the degradation level, which changes requests.
        ("a deterministic request twice: the second from the shared cache", requests.cached),
        ("a burst of requests with priorities", requests.burst),
        ("an unknown model", requests.unknown_model),
        ("a background job: submit now, fetch later", requests.background_job),
        ("the nodes and counters", requests.nodes),
        ("the status page and the Prometheus metrics", requests.status),
    ]


def run_steps(steps: list[Step], fleet: DemoFleet) -> int:
    """Run each step, going on after a failed one; returns how many failed.

    Stops early when a fleet process died: every later step would only time out.
    """
    failed = 0
    for number, (title, step) in enumerate(steps, 1):
        print(f"\n[{number}/{len(steps)}] {title}")
        try:
            step()
        except (StepFailed, ollama.ResponseError, httpx.HTTPError, ConnectionError) as exc:
            failed += 1
            print(f"      FAILED: {type(exc).__name__}: {exc}")
            fleet.check_alive()
    return failed


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral demo",
        description="Start a local Corral fleet (Redis, two fake Ollama nodes with their "
        "workers, a scheduler, a gateway), send it real requests with the ollama client, "
        "print what happened and stop everything.",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the fleet running after the requests"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="gateway port (default: a free one; Ollama's: 11434)"
    )
    parser.add_argument(
        "--embedded-redis",
        action="store_true",
        help="use the in-process fakeredis server even when redis-server is installed",
    )
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so a killed demo still stops its fleet and Redis."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def demo(fleet: DemoFleet) -> int:
    """Start the fleet, run every step; 0 when all passed."""
    began = time.monotonic()
    print(
        "corral demo: a whole fleet on this machine, and real requests to it through the\n"
        "official ollama Python client, as an application would send them\n"
    )
    print("starting")
    fleet.start()
    health = fleet.wait_ready(READY_TIMEOUT)
    models = ", ".join(health.get("models", []))
    print(f"ready in {time.monotonic() - began:.1f}s: {health['nodes']} nodes serving {models}")
    client, job_ids = tracked_client(fleet.gateway_url)
    with httpx.Client(base_url=fleet.gateway_url, timeout=REQUEST_TIMEOUT) as http, client:
        steps = steps_of(Requests(fleet.gateway_url, http, client, job_ids))
        failed = run_steps(steps, fleet)
    took = time.monotonic() - began
    if failed:
        print(f"\n{failed} of {len(steps)} steps FAILED ({took:.1f}s)")
        return 1
    print(f"\nall {len(steps)} steps passed in {took:.1f}s")
    return 0


def curl_examples(url: str, redis_url: str) -> list[str]:
    generate = '{"model": "llama3", "prompt": "Why is the sky blue?", "stream": false}'
    chat = '{"model": "qwen2:0.5b", "messages": [{"role": "user", "content": "hello there"}]}'
    return [
        f"curl {url}/api/generate -d '{generate}'",
        f"curl -N {url}/api/chat -d '{chat}'",
        f"curl {url}/api/tags",
        f"curl {url}/nodes",
        f"curl {url}/metrics    # or open {url}/status in a browser",
        f"corral submit --gateway {url} --model llama3 --prompt 'hello' --priority 0",
        f"corral status --redis-url {shlex.quote(redis_url)}",
    ]


RUN_ENV = Path(".corral") / "run.env"
"""Where a kept fleet leaves its addresses, for ``make dashboard`` and scripts."""


def client_hints(url: str, redis_url: str) -> list[str]:
    """How to point clients and ``redis-cli`` at this fleet (its ports are its own)."""
    redis = urlsplit(redis_url)
    return [
        f"export OLLAMA_HOST={url}        # the ollama CLI and Python client",
        f"export OPENAI_BASE_URL={url}/v1  # OpenAI clients",
        f"export CORRAL_REDIS_URL={redis_url}",
        f"redis-cli -h {redis.hostname} -p {redis.port} HGETALL corral:stats",
        "make dashboard                  # rq-dashboard (dead letters) on this Redis",
    ]


def write_run_env(fleet: DemoFleet, path: Path = RUN_ENV) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f"CORRAL_REDIS_URL={shlex.quote(fleet.redis_url)}\n"
        f"CORRAL_GATEWAY_URL={shlex.quote(fleet.gateway_url)}\n"
    )


def wait_for_ctrl_c(fleet: DemoFleet) -> None:
    """Print how to use the running fleet, then idle until Ctrl-C (or SIGTERM)."""
    print(f"\nthe fleet keeps running: gateway {fleet.gateway_url}, logs in {fleet.logdir}")
    print("point clients at it:")
    for line in client_hints(fleet.gateway_url, fleet.redis_url):
        print(f"  {line}")
    print("try, from another terminal:")
    for line in curl_examples(fleet.gateway_url, fleet.redis_url):
        print(f"  {line}")
    print(f"open {fleet.gateway_url}/status for the live dashboard")
    print("press Ctrl-C to stop", flush=True)
    try:
        write_run_env(fleet)
    except OSError as exc:  # a read-only directory: only make dashboard loses its default
        print(f"(could not write {RUN_ENV}: {exc})")
    try:
        # Polled, not a bare wait: a process that dies while we idle should be reported.
        while True:
            fleet.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print()
    finally:
        RUN_ENV.unlink(missing_ok=True)


def run(fleet: DemoFleet, keep: bool) -> int:
    """The demo with its fleet always stopped afterwards; returns the exit code."""
    code = 1
    with sigterm_as_interrupt():
        try:
            code = demo(fleet)
            if code == 0 and keep:
                wait_for_ctrl_c(fleet)
        except KeyboardInterrupt:
            print("\ninterrupted")
            code = 130
        except FleetDown as exc:
            print(f"\nFAILED: {exc}")
        except Exception as exc:  # report any surprise, then still stop the fleet
            print(f"\nFAILED: {type(exc).__name__}: {exc}")
        finally:
            print("stopping the fleet ...", flush=True)
            stopped = time.monotonic()
            fleet.stop()
            print(f"stopped in {time.monotonic() - stopped:.1f}s")
    return code


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logdir = Path(tempfile.mkdtemp(prefix="corral-demo-"))
    fleet = DemoFleet(logdir, args.port or free_port(), embedded_redis=args.embedded_redis)
    code = run(fleet, args.keep)
    if code not in (0, 130):
        fleet.print_logs()
    elif args.keep:  # whoever kept the fleet running may want to read what it logged
        print(f"logs kept in {logdir}")
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    return code
