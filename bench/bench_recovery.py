"""Benchmark 5, recovery: from a node's death to its in-flight jobs running elsewhere.

Three nodes (fake Ollama with 4 slots at 20 tokens/s, and a worker each), a gateway and
the scheduler. Four long ``stream: false`` generates run; the node holding most of them
gets SIGKILL (worker and fake together). Recovery time of a job: from the kill to the
moment another node's fake logs the same prompt as started (``/_fake/stats`` ``started``
log, stamped by the fake itself). The dead node is detected by the scheduler once its
heartbeat is older than ``--node-ttl``.

Scenarios:

A. node ttl 2 s, heartbeat 0.5 s: several kills, each dead node replaced by a fresh one
   under a new id; p50 of the recovery time.
B. the killed node's worker and fake restart after 2 s under the same node id (what the
   shipped systemd unit, ``Restart=always`` / ``RestartSec=2``, does), default node ttl
   6 s.
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


def start_fleet(name: str, ttl: float | None) -> Fleet:
    common = ["--node-ttl", str(ttl)] if ttl is not None else []
    fleet = Fleet(name, common=common)
    try:
        fleet.start_redis()
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


def scenario_kills(smoke: bool) -> dict[str, Any]:
    kills = 1 if smoke else 5
    fleet = start_fleet("recovery-kills", 2.0)
    runs = []
    try:
        for k in range(kills):
            res = run_uvloop(lambda k=k: one_kill(fleet, f"k{k}", 10.0 if smoke else 15.0))
            res["scheduler_error"] = _scheduler_error(fleet)
            runs.append(res)
            if res["scheduler_error"]:
                break  # nothing will be taken back any more
            if k + 1 < kills:  # replace the dead node with a fresh one (new id)
                fleet.add_node(
                    f"{res['victim']}-r{k}", spec(), worker_args=["--heartbeat-interval", "0.5"]
                )
                fleet.wait_gateway_nodes(3)
    finally:
        fleet.stop()
    return {"runs": runs}


def scenario_same_id(smoke: bool) -> dict[str, Any]:
    fleet = start_fleet("recovery-same-id", None)
    try:
        res = run_uvloop(
            lambda: one_kill(fleet, "s", 10.0 if smoke else 20.0, restart_same_id_after=2.0)
        )
        res["scheduler_error"] = _scheduler_error(fleet)
        res["watched_s"] = 10.0 if smoke else 20.0
        return res
    finally:
        fleet.stop()


def run(smoke: bool) -> report.Result:
    raise_nofile()
    return _result(scenario_kills(smoke), scenario_same_id(smoke), smoke)


def _outcome_text(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))


def _result(kills: dict[str, Any], same: dict[str, Any], smoke: bool) -> report.Result:
    runs = kills["runs"]
    times = [t for r in runs for t in r["times"]]
    moved = sum(r["in_flight_on_victim"] for r in runs)
    recovered = sum(r["recovered"] for r in runs)
    per_kill = [percentile(r["times"], 50) for r in runs if r["times"]]
    md = [
        "## 5. Recovery from a node's death",
        "",
        f"Three nodes (fake: {SLOTS} slots, {RATE:g} tokens/s; worker with "
        "`--heartbeat-interval 0.5`), gateway, scheduler (default `--interval 1`). "
        f"{JOBS} `stream: false` generates of {TOKENS} tokens run; the node holding most of "
        "them gets SIGKILL (worker and fake). Recovery time of a job: kill to the moment "
        "another node's fake logs its prompt as started (the fake's own timestamp).",
        "",
        "### A. Node ttl 2 s, the dead node replaced by a fresh one between kills",
        "",
        report.table(
            [
                "kill",
                "victim",
                "jobs moved",
                "re-run",
                "recovery p50 s",
                "max s",
                "still `running` on the dead node",
                "clients",
            ],
            [
                [
                    i + 1,
                    r["victim"],
                    r["in_flight_on_victim"],
                    r["recovered"],
                    fmt_s(percentile(r["times"], 50)),
                    fmt_s(max(r["times"])) if r["times"] else "n/a",
                    r["still_running_in_redis"],
                    _outcome_text(r),
                ]
                for i, r in enumerate(runs)
            ],
        ),
        "",
        f"**Recovery time p50 over all {len(times)} moved jobs: "
        f"{fmt_s(percentile(times, 50))} s** (p99 {fmt_s(percentile(times, 99))} s; "
        f"{recovered} of {moved} re-run). Per-kill p50s: "
        f"{', '.join(f'{t:.2f}' for t in per_kill) or 'none'} s. Expected: the node ttl "
        "(2 s) after the last heartbeat (up to 0.5 s before the kill), then up to one "
        "scheduler interval (1 s), then the claim.",
        "",
    ]
    dead = next((r["scheduler_error"] for r in runs if r["scheduler_error"]), "")
    if dead:
        md += [
            f"**The scheduler exited.** Its last log line: `{dead[:300]}`. Nothing the dead "
            "node held was taken back; those jobs stay `running` until their clients time "
            "out (`--request-timeout`, 600 s by default).",
            "",
        ]
    md += [
        "### B. Worker and fake restarted under the same node id after 2 s (node ttl 6 s)",
        "",
        report.table(
            [
                "jobs on the killed node",
                "re-run",
                "scheduler alive",
                "jobs `running` on that node id at the end (re-runs there included)",
                "clients",
            ],
            [
                [
                    same["in_flight_on_victim"],
                    f"{same['recovered']} (watched {same['watched_s']:g} s)"
                    + (
                        f": after {', '.join(f'{t:.1f}' for t in same['times'])} s"
                        if same["times"]
                        else ""
                    ),
                    "yes" if same["scheduler_alive"] else "no",
                    same["still_running_in_redis"],
                    _outcome_text(same),
                ]
            ],
        ),
        "",
        "This is what the shipped systemd unit does after a crash (`Restart=always`, "
        "`RestartSec=2`, the node id defaults to the host name). "
        + (
            "The node is back under the same id before its heartbeat is `--node-ttl` old, "
            "so the scheduler never sees it dead and never takes back the stream entries "
            "its previous process had claimed, and the new worker does not look at them "
            "either: those jobs stay `running` until their clients time out "
            "(`--request-timeout`, 600 s by default)."
            if same["recovered"] < same["in_flight_on_victim"]
            else "The jobs were taken back."
        ),
    ]
    goals = report.Goals()
    goals.info(
        "recovery p50 (node ttl 2 s, heartbeat 0.5 s)",
        f"{fmt_s(percentile(times, 50))} s ({recovered} of {moved} re-run)"
        + ("; scheduler exited" if dead else ""),
    )
    goals.info(
        "recovery, worker back under the same id after 2 s",
        f"{same['recovered']} of {same['in_flight_on_victim']} jobs re-run",
    )
    if smoke:
        md.insert(1, "\n_Smoke run: one kill per scenario, shorter watches._")
    return {
        "name": "recovery",
        "markdown": "\n".join(md),
        "summary": goals.rows,
        "data": {"kills": kills, "same_id": same, "p50_s": percentile(times, 50)},
    }


def main() -> int:
    return report.main(__doc__ or "", lambda args: run(args.smoke))


if __name__ == "__main__":
    raise SystemExit(main())
