"""Benchmark 4, scheduling quality: Corral against push balancing on the same fake fleet.

One seeded job list, replayed against three systems, each on a fresh copy of the same
fleet: ``bench/push_balancer.py`` in round-robin and in least-connections mode, and
Corral (gateway + one worker per node + scheduler). The fleet is hard on purpose:

* heterogeneous nodes: token rates differ 5x between the fastest and the slowest;
* mixed models, one loaded model per node (``--max-loaded-models 1``) and a load delay,
  so sending a model to a node that has another one loaded costs a reload;
* bursty arrivals: jobs come in bursts separated by quiet gaps;
* one node dies mid-run: its fake Ollama (and, for Corral, its worker) get SIGKILL.

Every job is a streamed ``/api/generate`` with a fixed ``num_predict``. Reported per
system: makespan against the ideal, useful slot utilisation, p50/p99 completion time,
model loads (from the fakes' stats), failed requests and how jobs spread over nodes.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import report
from fleetctl import FakeSpec, Fleet, Node, raise_nofile
from httpload import Connection, HttpError, fmt_ms, get_json, percentile, run_uvloop

from corral.tooling.redis_proc import free_port

MODELS = ["alpha:7b", "beta:7b", "gamma:7b"]
POPULARITY = [0.55, 0.30, 0.15]
RATES = [100.0, 60.0, 40.0, 20.0]  # tokens/s per slot, per node
SLOTS = 2
LOAD_DELAY = 1.5
VICTIM = 1  # index of the node killed mid-run (the second fastest)
SEED = 20240611


@dataclass
class Job:
    index: int
    at: float  # seconds after the start
    model: str
    tokens: int


@dataclass
class Outcome:
    job: Job
    ok: bool = False
    error: str = ""
    sent: float = 0.0
    done: float = 0.0
    tokens: int = 0
    eval_s: float = 0.0
    load_s: float = 0.0


@dataclass
class Workload:
    jobs: list[Job]
    kill_at: float

    @property
    def tokens(self) -> int:
        return sum(j.tokens for j in self.jobs)


def make_workload(smoke: bool, seed: int = SEED) -> Workload:
    rng = random.Random(seed)
    bursts = 3 if smoke else 6
    jobs: list[Job] = []
    t = 0.0
    for _ in range(bursts):
        size = rng.randint(6, 10) if smoke else rng.randint(10, 20)
        for _ in range(size):
            model = rng.choices(MODELS, POPULARITY)[0]
            jobs.append(Job(len(jobs), t + rng.uniform(0, 0.4), model, rng.randint(10, 90)))
        t += rng.expovariate(1 / (1.0 if smoke else 2.0)) + 0.5
    jobs.sort(key=lambda j: j.at)
    for i, job in enumerate(jobs):
        job.index = i
    return Workload(jobs, kill_at=t * 0.45)


def fleet_specs() -> list[FakeSpec]:
    return [
        FakeSpec(
            models=MODELS,
            num_parallel=SLOTS,
            max_loaded_models=1,
            load_delay=LOAD_DELAY,
            token_rate=rate,
            preload=[MODELS[i % len(MODELS)]],
            max_queue=4096,
        )
        for i, rate in enumerate(RATES)
    ]


# ------------------------------------------------------------------------------ replay


async def _one(url: str, job: Job, out: Outcome, t0: float) -> None:
    await asyncio.sleep(max(0.0, t0 + job.at - time.perf_counter()))
    conn = Connection(url)
    buf = bytearray()
    final: dict[str, Any] = {}
    tokens = 0
    error = ""

    def on_body(chunk: bytes) -> None:
        nonlocal tokens, error
        buf.extend(chunk)
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if not line.strip():
                continue
            obj = orjson.loads(line)
            if "error" in obj:
                error = f"error line: {str(obj['error'])[:60]}"
            elif obj.get("done"):
                final.update(obj)
            else:
                tokens += 1

    body = orjson.dumps(
        {
            "model": job.model,
            "prompt": f"job {job.index}",
            "stream": True,
            "options": {"num_predict": job.tokens},
        }
    )
    out.sent = time.perf_counter() - t0
    try:
        resp = await conn.request("POST", "/api/generate", body, on_body=on_body, time_limit=300)
    except HttpError as exc:
        out.error = exc.kind
        return
    finally:
        conn.close()
    out.done = time.perf_counter() - t0
    if buf.strip():
        on_body(b"\n")
    if resp.status != 200:
        out.error = f"http-{resp.status}"
    elif error:
        out.error = error
    elif not final:
        out.error = "stream ended without done"
    else:
        out.ok = True
        out.tokens = tokens
        out.eval_s = final.get("eval_duration", 0) / 1e9
        out.load_s = final.get("load_duration", 0) / 1e9


async def _fake_stats(node: Node) -> dict[str, Any]:
    stats = await get_json(node.fake_url + "/_fake/stats", time_limit=5)
    return {
        "loads": stats["loads"],
        "evictions": stats["evictions"],
        "requests": stats["requests"].get("/api/generate", stats["requests"].get("generate", 0)),
        "completed": stats["completed"],
    }


async def replay(url: str, nodes: list[Node], work: Workload, cap: float) -> dict[str, Any]:
    outcomes = [Outcome(j) for j in work.jobs]
    node_stats: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter() + 0.2
    tasks = [
        asyncio.create_task(_one(url, j, o, t0)) for j, o in zip(work.jobs, outcomes, strict=True)
    ]

    async def killer() -> float:
        await asyncio.sleep(max(0.0, t0 + work.kill_at - time.perf_counter()))
        victim = nodes[VICTIM]
        node_stats[victim.node_id] = await _fake_stats(victim)
        victim.kill()
        return time.perf_counter() - t0

    kill_task = asyncio.create_task(killer())
    _, late = await asyncio.wait(tasks, timeout=cap)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    killed_at = await kill_task
    for i, node in enumerate(nodes):
        if i != VICTIM:
            node_stats[node.node_id] = await _fake_stats(node)
    for o in outcomes:
        if not o.ok and not o.error:
            o.error = f"unfinished after {cap:g} s"
    return {"outcomes": outcomes, "nodes": node_stats, "killed_at": killed_at}


# ---------------------------------------------------------------------------- systems


def run_push(mode: str, work: Workload, cap: float) -> dict[str, Any]:
    with Fleet(f"scheduling-{mode}") as fleet:
        nodes = [
            fleet.add_node(f"n{i + 1}", spec, with_worker=False)
            for i, spec in enumerate(fleet_specs())
        ]
        port = free_port()
        argv = [sys.executable, str(Path(__file__).with_name("push_balancer.py"))]
        argv += ["--port", str(port), "--mode", mode]
        for node in nodes:
            argv += ["--node", node.fake_url]
        proc = fleet.spawn(f"push-{mode}", argv)
        url = f"http://127.0.0.1:{port}"
        if not report.wait_until(lambda: _up(url + "/_balancer/stats"), 20):
            proc.check_alive()
            raise RuntimeError(f"push balancer did not start: {proc.log_tail()}")
        result: dict[str, Any] = run_uvloop(lambda: replay(url, nodes, work, cap))
        result["balancer"] = run_uvloop(lambda: get_json(url + "/_balancer/stats"))
        return result


def run_corral(work: Workload, cap: float) -> dict[str, Any]:
    with Fleet("scheduling-corral") as fleet:
        fleet.start_redis()
        nodes = [
            fleet.add_node(f"n{i + 1}", spec, wait=False) for i, spec in enumerate(fleet_specs())
        ]
        for node in nodes:
            fleet.wait_worker(node)
        fleet.start_gateway(expect_nodes=len(nodes))
        fleet.start_scheduler()
        result: dict[str, Any] = run_uvloop(lambda: replay(fleet.gateway_url, nodes, work, cap))
        assert fleet.scheduler is not None
        result["scheduler_alive"] = fleet.scheduler.alive
        result["scheduler_log"] = fleet.scheduler.log_problems(3)
        return result


def _up(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


# ---------------------------------------------------------------------------- metrics


def summarize(work: Workload, res: dict[str, Any]) -> dict[str, Any]:
    outcomes: list[Outcome] = res["outcomes"]
    ok = [o for o in outcomes if o.ok]
    first = min(j.at for j in work.jobs)
    makespan = max((o.done for o in ok), default=float("nan")) - first
    killed = res["killed_at"]
    slot_rates = [SLOTS * r for r in RATES]
    cap_all = sum(slot_rates)
    cap_after = cap_all - slot_rates[VICTIM]
    w = work.tokens
    ideal = w / cap_all if w <= cap_all * killed else killed + (w - cap_all * killed) / cap_after
    slots_all = SLOTS * len(RATES)
    slot_seconds = slots_all * min(killed, makespan) + (slots_all - SLOTS) * max(
        0.0, makespan - killed
    )
    bound, bound_at, bound_tokens = arrival_bound(work, killed)
    completion = [o.done - o.job.at for o in ok]
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error] = errors.get(o.error, 0) + 1
    nodes = res["nodes"]
    return {
        "jobs": len(outcomes),
        "ok": len(ok),
        "failed": len(outcomes) - len(ok),
        "errors": errors,
        "makespan": makespan,
        "ideal": ideal,
        "bound": bound,
        "bound_at": bound_at,
        "bound_tokens": bound_tokens,
        "utilisation": sum(o.eval_s for o in ok) / slot_seconds if slot_seconds > 0 else 0.0,
        "p50": percentile(completion, 50),
        "p99": percentile(completion, 99),
        "loads": sum(n["loads"] for n in nodes.values()),
        "spread": {k: v["requests"] for k, v in sorted(nodes.items())},
        "load_wait_s": sum(o.load_s for o in ok),
        "balancer_errors": res.get("balancer", {}).get("errors", {}),
        "scheduler_alive": res.get("scheduler_alive", True),
        "scheduler_log": res.get("scheduler_log", []),
    }


def arrival_bound(work: Workload, killed: float) -> tuple[float, float, int]:
    """A lower bound on the makespan that, unlike the ideal, counts arrivals: the work that
    arrives at or after each arrival time cannot finish before it plus that work over the
    capacity of the nodes alive then (loads still ignored). Sound for any system: no job
    starts before it arrives, and from time ``t`` on the fleet generates at most the sum
    of its live slots' rates (all of them before the kill, the survivors' after it; for
    an arrival before the kill the larger figure is taken, which only weakens the bound).

    Returns the bound (seconds after the first arrival), the arrival time that sets it
    and the tokens arriving at or after that time."""
    slot_rates = [SLOTS * r for r in RATES]
    after = sum(slot_rates) - slot_rates[VICTIM]
    first = min(j.at for j in work.jobs)
    best, at, tokens = 0.0, first, 0
    for job in work.jobs:
        later = sum(j.tokens for j in work.jobs if j.at >= job.at)
        capacity = sum(slot_rates) if job.at < killed else after
        if job.at + later / capacity > best:
            best, at, tokens = job.at + later / capacity, job.at, later
    return best - first, at - first, tokens


def run(smoke: bool) -> report.Result:
    raise_nofile()
    work = make_workload(smoke)
    cap = 60.0 if smoke else 100.0
    results: dict[str, dict[str, Any]] = {}
    for label, fn in (
        ("push, round-robin", lambda: run_push("round-robin", work, cap)),
        ("push, least-connections", lambda: run_push("least-connections", work, cap)),
        ("Corral", lambda: run_corral(work, cap)),
    ):
        results[label] = summarize(work, fn())
    return _result(work, results, smoke)


def _result(work: Workload, results: dict[str, dict[str, Any]], smoke: bool) -> report.Result:
    rows = []
    for label, s in results.items():
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "none"
        rows.append(
            [
                f"**{label}**",
                f"{s['makespan']:.1f}",
                f"{s['makespan'] / s['ideal']:.2f}x",
                f"{s['makespan'] / s['bound']:.2f}x",
                f"{s['utilisation'] * 100:.0f}%",
                fmt_ms(s["p50"], 0),
                fmt_ms(s["p99"], 0),
                s["loads"],
                f"{s['failed']} ({errs})",
            ]
        )
    spread_rows = [
        [label, *(s["spread"].get(f"n{i + 1}", 0) for i in range(len(RATES)))]
        for label, s in results.items()
    ]
    by_model = {m: sum(1 for j in work.jobs if j.model == m) for m in MODELS}
    first = next(iter(results.values()))
    md = [
        "## 4. Scheduling quality: Corral against push balancing",
        "",
        f"Same seeded job list (seed {SEED}) replayed against each system on a fresh copy "
        f"of the same fake fleet: {len(RATES)} nodes with {SLOTS} slots each at "
        f"{', '.join(f'{r:g}' for r in RATES)} tokens/s per slot, models "
        f"{', '.join(f'`{m}`' for m in MODELS)} ({', '.join(str(v) for v in by_model.values())} "
        f"jobs), `--max-loaded-models 1`, `--load-delay {LOAD_DELAY:g}`, each node starting "
        f"with one model loaded. {len(work.jobs)} streamed generates of 10-90 tokens "
        f"({work.tokens:,} tokens) arrive in bursts over "
        f"{max(j.at for j in work.jobs):.1f} s; node n{VICTIM + 1} (fake and worker) gets "
        f"SIGKILL at {work.kill_at:.1f} s. Corral runs with default settings (node ttl 6 s, "
        "scheduler interval 1 s).",
        "",
        f"Ideal makespan: total work over total capacity, with the capacity dropping when "
        f"n{VICTIM + 1} dies: {first['ideal']:.1f} s (it ignores arrivals and model loads, "
        "so no system can reach it). Arrival bound: a lower bound that also counts arrivals "
        f"({first['bound']:.1f} s): the work arriving at or after each arrival time cannot "
        "finish before that time plus the work over the live capacity (loads still ignored). "
        f"Here the jobs arriving from {first['bound_at']:.1f} s on carry "
        f"{first['bound_tokens']:,} tokens, which the {SLOTS * (sum(RATES) - RATES[VICTIM]):g} "
        f"tokens/s left after n{VICTIM + 1}'s death need {first['bound'] - first['bound_at']:.1f}"
        f" s for: the bound is {first['bound'] / first['ideal']:.2f}x the ideal, so **the "
        f"goal of 1.5x the ideal ({1.5 * first['ideal']:.1f} s) cannot be met on this "
        "workload by any system**; makespan against the arrival bound is the figure that "
        "says how close a system gets. "
        "Utilisation: generation time of the answered jobs "
        "(`eval_duration`) over the slot-seconds the live nodes offered during the makespan.",
        "",
        report.table(
            [
                "system",
                "makespan s",
                "vs ideal",
                "vs arrival bound",
                "slot utilisation",
                "p50 completion ms",
                "p99 completion ms",
                "model loads",
                "failed requests",
            ],
            rows,
        ),
        "",
        "Jobs each node received (`requests.generate` in the fakes' stats; n"
        f"{VICTIM + 1} read just before it was killed):",
        "",
        report.table(
            ["system", *(f"n{i + 1} ({r:g} tok/s)" for i, r in enumerate(RATES))], spread_rows
        ),
        "",
        "Push balancer counters: "
        + "; ".join(
            f"{label}: {_counters(s['balancer_errors'])}"
            for label, s in results.items()
            if label.startswith("push")
        )
        + ".",
        "",
        *_scheduler_note(results.get("Corral", {})),
        "Notes: a push balancer hands every request to a node at once, so each node's own "
        "queue holds them, in arrival order and whatever their model: slow nodes get as "
        "many jobs as fast ones (round-robin) or as many as they have in flight "
        "(least-connections), and a node switches models as often as its queue does. When "
        "a node dies, the balancer re-sends the requests it had queued there (no response "
        "header yet) to the next node, at the back of that node's queue, and cuts the "
        "answers already streaming. Corral's workers pull a job only when they have a free "
        "slot, with the placement rules of the README (model locality, tail-aware claims "
        "on uneven nodes, circuit breakers), and a job whose node dies after it streamed "
        "part of its answer is continued by another node (`CORRAL_RESUME_STREAMS`).",
    ]
    goals = report.Goals()
    for label, s in results.items():
        goals.info(
            f"scheduling: {label}",
            f"makespan {s['makespan'] / s['ideal']:.2f}x ideal, p99 "
            f"{s['p99']:.1f} s, {s['loads']} loads, {s['failed']} failed",
        )
    corral = results.get("Corral")
    if corral:
        md += [
            "",
            goals.check(
                "scheduling: Corral makespan vs ideal",
                corral["makespan"] / corral["ideal"],
                1.5,
                "x",
                lower_is_better=True,
            ),
            goals.check(
                "scheduling: Corral makespan vs arrival bound",
                corral["makespan"] / corral["bound"],
                1.5,
                "x",
                lower_is_better=True,
            ),
            goals.check(
                "scheduling: Corral model loads", corral["loads"], 10, "", lower_is_better=True
            ),
            f"- scheduling: Corral failed requests: {corral['failed']} (goal 0)",
        ]
    if smoke:
        md.insert(1, "\n_Smoke run: a few dozen jobs, numbers are indicative only._")
    return {
        "name": "scheduling",
        "markdown": "\n".join(md),
        "summary": goals.rows,
        "data": {"results": results, "tokens": work.tokens, "jobs": len(work.jobs)},
    }


def _scheduler_note(corral: dict[str, Any]) -> list[str]:
    if not corral or corral.get("scheduler_alive", True):
        return []
    lines = ", ".join(f"`{m}` ({n}x)" for m, n in corral.get("scheduler_log", []))
    return [
        f"**Corral's scheduler exited during the run** (its log: {lines}); jobs the dead "
        "node held were not taken back.",
        "",
    ]


def _counters(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in errors.items()) or "no errors"


def main() -> int:
    return report.main(__doc__ or "", lambda args: run(args.smoke))


if __name__ == "__main__":
    raise SystemExit(main())
