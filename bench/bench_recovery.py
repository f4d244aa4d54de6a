"""Benchmark 5, recovery: from a node's death to its in-flight jobs running elsewhere.

Three nodes (fake Ollama with 4 slots at 20 tokens/s, and a worker each), a gateway and
the scheduler. Four long ``stream: false`` generates run; the node holding most of them
gets SIGKILL (worker and fake together). Recovery time of a job: from the kill to the
moment another node's fake logs the same prompt as started (``/_fake/stats`` ``started``
log, stamped by the fake itself). The dead node is detected by the scheduler once its
heartbeat is older than ``--node-ttl``.

Scenarios:

A. as shipped, node ttl 2 s, heartbeat 0.5 s: one kill, watched for a while.
B. the same, with every (model, priority) stream created beforehand (the workaround for
   what A shows): several kills, p50 of the recovery time.
C. the killed node's worker and fake restart after 2 s under the same node id (what the
   shipped systemd unit, ``Restart=always`` / ``RestartSec=2``, does), default node ttl
   6 s, streams pre-created as in B.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import report
from fleetctl import FakeSpec, Fleet, Node, raise_nofile
from httpload import Connection, HttpError, fmt_s, get_json, percentile, post_json, run_uvloop

MODEL = "bench:latest"
SLOTS = 4
RATE = 20.0
JOBS = 4
TOKENS = 400  # 20 s at 20 tokens/s: still running when the node dies


def spec() -> FakeSpec:
    return FakeSpec(models=[MODEL], num_parallel=SLOTS, token_rate=RATE)


def start_fleet(name: str, ttl: float | None, *, precreate: bool) -> Fleet:
    common = ["--node-ttl", str(ttl)] if ttl is not None else []
    fleet = Fleet(name, common=common)
    try:
        fleet.start_redis()
        if precreate:
            fleet.precreate_priority_streams([MODEL])
        for i in range(3):
            fleet.add_node(f"n{i + 1}", spec(), worker_args=["--heartbeat-interval", "0.5"])
        fleet.start_gateway(expect_nodes=3)
        fleet.start_scheduler()
    except BaseException:
        fleet.stop()
        raise
    return fleet


async def _job(url: str, prompt: str) -> str:
    conn = Connection(url)
    body = orjson.dumps(
        {"model": MODEL, "prompt": prompt, "stream": False, "options": {"num_predict": TOKENS}}
    )
    try:
        resp = await conn.request("POST", "/api/generate", body, time_limit=600)
    except HttpError as exc:
        return exc.kind
    finally:
        conn.close()
    return "ok" if resp.status == 200 else f"http-{resp.status}"


async def _started(node: Node) -> list[dict[str, Any]]:
    try:
        stats = await get_json(node.fake_url + "/_fake/stats", time_limit=5)
    except (HttpError, OSError):
        return []
    return list(stats.get("started", []))


async def one_kill(
    fleet: Fleet, tag: str, watch_s: float, restart_same_id_after: float | None = None
) -> dict[str, Any]:
    """Start JOBS long jobs, kill the busiest node, time the re-runs."""
    prompts = [f"{tag} job {i}" for i in range(JOBS)]
    clients = [asyncio.create_task(_job(fleet.gateway_url, p)) for p in prompts]
    where: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while len(where) < JOBS and time.monotonic() < deadline:
        for node in fleet.nodes:
            for entry in await _started(node):
                if entry["prompt"] in prompts:
                    where[entry["prompt"]] = node.node_id
        await asyncio.sleep(0.05)
    counts = {n.node_id: sum(1 for v in where.values() if v == n.node_id) for n in fleet.nodes}
    victim = max(fleet.nodes, key=lambda n: counts[n.node_id])
    moved = [p for p, n in where.items() if n == victim.node_id]
    await asyncio.sleep(0.5)  # the jobs are well into their answers
    killed_at = time.time()
    victim.kill()
    survivors = [n for n in fleet.nodes if n is not victim]
    restarted: Node | None = None
    if restart_same_id_after is not None:
        await asyncio.sleep(restart_same_id_after)
        fleet.nodes.remove(victim)
        restarted = fleet.add_node(
            victim.node_id, spec(), worker_args=["--heartbeat-interval", "0.5"]
        )
        survivors.append(restarted)
    rerun: dict[str, float] = {}
    deadline = time.monotonic() + watch_s
    while len(rerun) < len(moved) and time.monotonic() < deadline:
        for node in survivors:
            for entry in await _started(node):
                if entry["prompt"] in moved and entry["t"] > killed_at:
                    rerun.setdefault(entry["prompt"], entry["t"] - killed_at)
        await asyncio.sleep(0.05)
    scheduler_alive = fleet.scheduler is not None and fleet.scheduler.alive
    stuck = _running_on(fleet, victim.node_id)
    # Finish what can finish: instant answers on the live nodes, then collect.
    for node in survivors:
        await post_json(node.fake_url + "/_fake/config", {"token_rate": 0})
    done, pending = await asyncio.wait(clients, timeout=10)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    outcomes: dict[str, int] = {}
    for task in done:
        outcomes[task.result()] = outcomes.get(task.result(), 0) + 1
    if pending:
        outcomes["still waiting (client gave up)"] = len(pending)
    for node in survivors:
        await post_json(node.fake_url + "/_fake/config", {"token_rate": RATE})
    if restarted is None:
        fleet.nodes.remove(victim)
    return {
        "victim": victim.node_id,
        "in_flight_on_victim": len(moved),
        "recovered": len(rerun),
        "times": sorted(rerun.values()),
        "scheduler_alive": scheduler_alive,
        "outcomes": outcomes,
        "restarted": restarted is not None,
        "still_running_in_redis": stuck,
    }


def _running_on(fleet: Fleet, node_id: str) -> int:
    """Job records that still say ``running`` on ``node_id``."""
    client = fleet.redis_client()
    try:
        count = 0
        for key in client.scan_iter("corral:job:*", count=1000):
            state, node = client.hmget(key, "state", "node")
            if state == b"running" and node == node_id.encode():
                count += 1
        return count
    finally:
        client.close()


def _scheduler_error(fleet: Fleet) -> str:
    if fleet.scheduler is None or fleet.scheduler.alive:
        return ""
    lines = [ln for ln in fleet.scheduler.log_tail(4000).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {fleet.scheduler.popen.returncode}"


def scenario_a(smoke: bool) -> dict[str, Any]:
    fleet = start_fleet("recovery-a", 2.0, precreate=False)
    try:
        res = run_uvloop(lambda: one_kill(fleet, "a", 6.0 if smoke else 15.0))
        res["scheduler_error"] = _scheduler_error(fleet)
        return res
    finally:
        fleet.stop()


def scenario_b(smoke: bool) -> dict[str, Any]:
    kills = 1 if smoke else 5
    fleet = start_fleet("recovery-b", 2.0, precreate=True)
    runs = []
    try:
        for k in range(kills):
            res = run_uvloop(lambda k=k: one_kill(fleet, f"b{k}", 20.0))
            res["scheduler_error"] = _scheduler_error(fleet)
            runs.append(res)
            if k + 1 < kills:  # replace the dead node with a fresh one (new id)
                fleet.add_node(
                    f"{res['victim']}-r{k}", spec(), worker_args=["--heartbeat-interval", "0.5"]
                )
                fleet.wait_gateway_nodes(3)
    finally:
        fleet.stop()
    return {"runs": runs}


def scenario_c(smoke: bool) -> dict[str, Any]:
    fleet = start_fleet("recovery-c", None, precreate=True)
    try:
        res = run_uvloop(
            lambda: one_kill(fleet, "c", 10.0 if smoke else 30.0, restart_same_id_after=2.0)
        )
        res["scheduler_error"] = _scheduler_error(fleet)
        return res
    finally:
        fleet.stop()


def run(smoke: bool) -> report.Result:
    raise_nofile()
    a = scenario_a(smoke)
    b = scenario_b(smoke)
    c = scenario_c(smoke)
    return _result(a, b, c, smoke)


def _result(a: dict[str, Any], b: dict[str, Any], c: dict[str, Any], smoke: bool) -> report.Result:
    times = [t for r in b["runs"] for t in r["times"]]
    moved = sum(r["in_flight_on_victim"] for r in b["runs"])
    recovered = sum(r["recovered"] for r in b["runs"])
    per_kill = [percentile(r["times"], 50) for r in b["runs"] if r["times"]]

    def outcome_text(r: dict[str, Any]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))

    md = [
        "## 5. Recovery from a node's death",
        "",
        f"Three nodes (fake: {SLOTS} slots, {RATE:g} tokens/s; worker with "
        "`--heartbeat-interval 0.5`), gateway, scheduler (default `--interval 1`). "
        f"{JOBS} `stream: false` generates of {TOKENS} tokens run; the node holding most of "
        "them gets SIGKILL (worker and fake). Recovery time of a job: kill to the moment "
        "another node's fake logs its prompt as started.",
        "",
        "### A. As shipped (node ttl 2 s)",
        "",
        report.table(
            [
                "jobs on the killed node",
                "re-run elsewhere",
                "scheduler alive after",
                "still `running` on the dead node in Redis",
                "clients",
            ],
            [
                [
                    a["in_flight_on_victim"],
                    f"{a['recovered']} (watched {15 if not smoke else 6} s)",
                    "yes" if a["scheduler_alive"] else "**no, it exited**",
                    a["still_running_in_redis"],
                    outcome_text(a),
                ]
            ],
        ),
        "",
    ]
    if a["scheduler_error"]:
        md += [
            f"The scheduler's last log line: `{a['scheduler_error'][:300]}`",
            "",
            "The reclaim pass (`scheduler/reclaim.py`, `reclaim_node`) calls `XPENDING` on "
            "all ten priority streams of every known model; a priority never used has no "
            "stream, Redis answers `NOGROUP`, that `ResponseError` is not among the errors "
            "the scheduler loop rides out, and the process exits. The dead node stays in the "
            "registry, so a restarted scheduler fails the same way on its first pass. The "
            "jobs the node held stay `running`; their clients wait until "
            "`--request-timeout` (600 s by default).",
            "",
        ]
    md += [
        "### B. With every priority stream created beforehand (node ttl 2 s)",
        "",
        "`bench/fleetctl.py` `precreate_priority_streams` creates the ten streams and "
        "their group, as one job of each priority would. Between kills the dead node is "
        "replaced by a fresh one under a new id.",
        "",
        report.table(
            ["kill", "victim", "jobs moved", "re-run", "recovery p50 s", "max s", "clients"],
            [
                [
                    i + 1,
                    r["victim"],
                    r["in_flight_on_victim"],
                    r["recovered"],
                    fmt_s(percentile(r["times"], 50)),
                    fmt_s(max(r["times"])) if r["times"] else "n/a",
                    outcome_text(r),
                ]
                for i, r in enumerate(b["runs"])
            ],
        ),
        "",
        f"**Recovery time p50 over all {len(times)} moved jobs: "
        f"{fmt_s(percentile(times, 50))} s** (p99 "
        f"{fmt_s(percentile(times, 99))} s; {recovered} of {moved} re-run). "
        f"Per-kill p50s: {', '.join(f'{t:.2f}' for t in per_kill)} s. Expected: node ttl "
        "(2 s) + up to one scheduler interval (1 s) + up to one heartbeat interval (0.5 s) "
        "+ the claim.",
        "",
        "### C. Worker restarted under the same node id after 2 s (default node ttl 6 s)",
        "",
        report.table(
            [
                "jobs on the killed node",
                "re-run",
                "scheduler alive",
                "still `running` on that node id in Redis",
                "clients",
            ],
            [
                [
                    c["in_flight_on_victim"],
                    f"{c['recovered']} (watched {30 if not smoke else 10} s)"
                    + (
                        f": after {', '.join(f'{t:.1f}' for t in c['times'])} s"
                        if c["times"]
                        else ""
                    ),
                    "yes" if c["scheduler_alive"] else "no",
                    c["still_running_in_redis"],
                    outcome_text(c),
                ]
            ],
        ),
        "",
        "A node comes back under the same id before its heartbeat is `--node-ttl` old, so "
        "the scheduler never sees it dead and never takes back the stream entries its "
        "previous process claimed; the new worker does not look at them either. "
        "(When this row shows 0 re-runs, those jobs stay `running` until their clients "
        "time out.)",
    ]
    goals = report.Goals()
    goals.info(
        "recovery, as shipped",
        f"{a['recovered']} of {a['in_flight_on_victim']} jobs re-run"
        + ("; scheduler exited" if not a["scheduler_alive"] else ""),
    )
    goals.info(
        "recovery p50 (streams pre-created, node ttl 2 s)",
        f"{fmt_s(percentile(times, 50))} s ({recovered} of {moved} re-run)",
    )
    goals.info(
        "recovery, worker back under the same id after 2 s",
        f"{c['recovered']} of {c['in_flight_on_victim']} jobs re-run",
    )
    if smoke:
        md.insert(1, "\n_Smoke run: one kill per scenario, shorter watches._")
    return {
        "name": "recovery",
        "markdown": "\n".join(md),
        "summary": goals.rows,
        "data": {"a": a, "b": b, "c": c, "p50_s": percentile(times, 50)},
    }


def main() -> int:
    args = report.parser(__doc__ or "").parse_args()
    report.emit(run(args.smoke), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
