"""Benchmark 3, scale: 10,000 waiting requests on one gateway, 100 nodes heartbeating.

Phases, with one gateway process:

1. idle: 100 simulated nodes heartbeat every 2 s (``bench/sim_nodes.py``); the gateway's
   ``/api/tags`` latency is probed; gateway RSS is read after a short warm-up.
2. hold: 10,000 clients, each with its own connection, send a slow generate (the fake
   node gives 1 token/s and every request asks for 4 tokens, 64 slots): almost all of
   them wait in the queue. RSS is read once the gateway reports them all waiting.
3. drain: the fake is switched to instant answers (``POST /_fake/config``) and every
   request must come back 200.

``/api/tags`` is probed from a separate process throughout (about 10 per second).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import report
from fleetctl import OUT_DIR, FakeSpec, Fleet, raise_nofile
from httpload import (
    Connection,
    HttpError,
    fmt_ms,
    get_json,
    open_connections,
    percentile,
    post_json,
    run_uvloop,
)

MODEL = "bench:latest"
SLOTS = 64
TOKENS = 30  # 30 s per answer at 1 token/s: about 2 answers a second while they wait
GOAL_KB = 20.0


# ----------------------------------------------------------------------- /api/tags probe


async def probe(url: str, seconds: float, interval: float = 0.1) -> list[tuple[float, float, int]]:
    """GET /api/tags in a loop until SIGTERM (or ``seconds``); (wall time, latency, status)."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    conn = Connection(url)
    samples: list[tuple[float, float, int]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        wall = time.time()
        try:
            resp = await conn.request("GET", "/api/tags", time_limit=30)
            samples.append((wall, resp.latency, resp.status))
        except HttpError as exc:
            samples.append((wall, float("nan"), -1))
            print("probe error", exc, file=sys.stderr)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
    conn.close()
    return samples


# ------------------------------------------------------------------------------ the run


async def hold_and_drain(
    fleet: Fleet, count: int, phases: dict[str, float], rss: dict[str, Any]
) -> dict[str, Any]:
    assert fleet.gateway is not None
    gw = fleet.gateway
    node = fleet.nodes[0]
    errors: Counter[str] = Counter()
    ok = 0
    body = {"model": MODEL, "stream": False, "options": {"num_predict": TOKENS}}

    # Warm-up: the code paths, pools and caches a busy gateway has, before "before".
    await post_json(node.fake_url + "/_fake/config", {"token_rate": 0})
    warm = await open_connections(fleet.gateway_url, 32)
    await asyncio.gather(
        *(
            c.request("POST", "/api/generate", orjson.dumps({**body, "prompt": f"w{i}"}))
            for i, c in enumerate(warm)
        )
    )
    for c in warm:
        c.close()
    await post_json(node.fake_url + "/_fake/config", {"token_rate": 1.0})
    await asyncio.sleep(2.0)
    rss["before"] = gw.rss()
    phases["hold_start"] = time.time()

    conns = await open_connections(fleet.gateway_url, count, per_second=2500, errors=errors)
    rss["after_connect"] = gw.rss()

    async def one(i: int, conn: Connection) -> None:
        nonlocal ok
        payload = orjson.dumps({**body, "prompt": f"hold {i}"})
        try:
            resp = await conn.request("POST", "/api/generate", payload, time_limit=600)
        except HttpError as exc:
            errors[exc.kind] += 1
            return
        if resp.status != 200:
            errors[f"http-{resp.status}"] += 1
        else:
            ok += 1

    tasks = [asyncio.create_task(one(i, c)) for i, c in enumerate(conns)]
    # Until every request is waiting, answered or failed (or 90 s pass), then a few
    # seconds of steady state.
    waiting = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        health = await get_json(fleet.gateway_url + "/healthz", time_limit=60)
        waiting = int(health.get("waiting", 0))
        if waiting + ok + sum(errors.values()) >= count:
            break
        await asyncio.sleep(0.5)
    rss["waiting_seen"] = waiting
    phases["all_waiting"] = time.time()
    peak = 0
    for _ in range(10):
        peak = max(peak, gw.rss())
        await asyncio.sleep(0.5)
    rss["during"] = peak
    phases["drain_start"] = time.time()
    t0 = time.perf_counter()
    await post_json(node.fake_url + "/_fake/config", {"token_rate": 0})
    await asyncio.gather(*tasks)
    drain_s = time.perf_counter() - t0
    phases["drain_end"] = time.time()
    for c in conns:
        c.close()
    await asyncio.sleep(1.0)
    rss["after"] = gw.rss()
    return {"ok": ok, "errors": dict(errors), "drain_s": drain_s, "connected": len(conns)}


def run(smoke: bool) -> report.Result:
    count = 500 if smoke else 10_000
    sim_nodes = 100
    limit = raise_nofile(65536)
    phases: dict[str, float] = {}
    rss: dict[str, Any] = {}
    probe_file = OUT_DIR / "scale-probe.json"
    probe_file.parent.mkdir(parents=True, exist_ok=True)
    probe_file.unlink(missing_ok=True)
    with Fleet("scale") as fleet:
        fleet.start_redis()
        fleet.add_node(
            "n1", FakeSpec(models=[MODEL], num_parallel=SLOTS, max_queue=4096, token_rate=1.0)
        )
        fleet.start_gateway(["--max-queue", str(count * 2)], expect_nodes=1)
        fleet.start_scheduler()
        fleet.spawn(
            "sim-nodes",
            [
                sys.executable,
                str(Path(__file__).with_name("sim_nodes.py")),
                "--redis-url",
                fleet.redis_url,
                "--nodes",
                str(sim_nodes),
                "--interval",
                "2",
            ],
        )
        registry = fleet.redis_client()
        report.wait_until(lambda: int(registry.zcard("corral:nodes")) >= sim_nodes + 1, 20)
        registry.close()
        prober = fleet.spawn(
            "tags-probe",
            [
                sys.executable,
                __file__,
                "--probe",
                fleet.gateway_url,
                "--probe-seconds",
                "900",
                "--probe-out",
                str(probe_file),
            ],
        )
        time.sleep(1.0)
        phases["idle_start"] = time.time()
        time.sleep(3.0 if smoke else 8.0)
        outcome = run_uvloop(lambda: hold_and_drain(fleet, count, phases, rss))
        time.sleep(2.0)
        phases["end"] = time.time()
        prober.terminate()  # it writes its samples and exits
        prober.wait(10)
        fleet.wait_gateway_nodes(sim_nodes + 1)  # the registry still holds every node
        assert fleet.gateway is not None
        outcome["gateway_log"] = fleet.gateway.log_problems()
    samples = orjson.loads(probe_file.read_bytes()) if probe_file.exists() else []
    return _result(count, sim_nodes, outcome, rss, phases, samples, limit, smoke)


def _phase_stats(samples: list[list[float]], start: float, end: float) -> list[Any]:
    lat = [s[1] for s in samples if start <= s[0] < end and s[2] == 200]
    bad = sum(1 for s in samples if start <= s[0] < end and s[2] != 200)
    return [
        len(lat),
        fmt_ms(percentile(lat, 50), 1),
        fmt_ms(percentile(lat, 99), 1),
        fmt_ms(max(lat), 1) if lat else "n/a",
        bad,
    ]


def _result(
    count: int,
    sim_nodes: int,
    outcome: dict[str, Any],
    rss: dict[str, Any],
    phases: dict[str, float],
    samples: list[list[float]],
    limit: int,
    smoke: bool,
) -> report.Result:
    held = max(1, rss["waiting_seen"])
    per_kb = (rss["during"] - rss["before"]) / held / 1024
    conn_kb = (rss["after_connect"] - rss["before"]) / max(1, outcome["connected"]) / 1024
    mib = 2**20
    errors = outcome["errors"]
    err_text = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none"
    goals = report.Goals()
    waiting_lat = [
        s[1]
        for s in samples
        if phases["all_waiting"] <= s[0] < phases["drain_start"] and s[2] == 200
    ]
    md = [
        "## 3. Scale: waiting requests and a 100-node registry",
        "",
        f"{count:,} clients, one connection each, send a slow `stream: false` generate to "
        f"one gateway process (fake node: {SLOTS} slots at 1 token/s, {TOKENS} tokens per "
        "answer, so nearly all of them wait in the queue); the gateway runs with "
        f"`--max-queue {count * 2}` so the queue limit is not what is measured. Meanwhile "
        f"`bench/sim_nodes.py` heartbeats {sim_nodes} simulated nodes every 2 s "
        "(`corral.fleet.publish_heartbeat`, 4 models each). Open-file limit raised to "
        f"{limit} with `resource.setrlimit`. Once all wait, the fake is switched to instant "
        "answers and the queue drains.",
        "",
        report.table(
            ["measure", "value"],
            [
                ["gateway RSS before (idle, warmed up)", f"{rss['before'] / mib:.1f} MiB"],
                [
                    f"gateway RSS with {outcome['connected']:,} connections open, no request yet",
                    f"{rss['after_connect'] / mib:.1f} MiB ({conn_kb:.1f} KB per connection)",
                ],
                [
                    f"gateway RSS with {rss['waiting_seen']:,} requests waiting",
                    f"{rss['during'] / mib:.1f} MiB",
                ],
                ["**memory per waiting request**", f"**{per_kb:.1f} KB**"],
                ["gateway RSS after the drain", f"{rss['after'] / mib:.1f} MiB"],
                ["answers 200", f"{outcome['ok']:,} of {count:,}"],
                ["errors", err_text],
                [
                    "drain time (all answered after the switch)",
                    f"{outcome['drain_s']:.1f} s ({outcome['ok'] / outcome['drain_s']:,.0f} req/s)",
                ],
            ],
        ),
        "",
        "Goals:",
        "",
        goals.check(
            "gateway memory per waiting request", per_kb, GOAL_KB, "KB", lower_is_better=True
        ),
        goals.count(f"errors with {count:,} waiting requests", sum(errors.values())),
        "",
        f"`GET /api/tags` through the gateway while {sim_nodes + 1} nodes heartbeat "
        "(sequential probe from its own process, ~10/s):",
        "",
        report.table(
            ["phase", "probes", "p50 ms", "p99 ms", "max ms", "failed"],
            [
                ["idle", *_phase_stats(samples, phases["idle_start"], phases["hold_start"])],
                [
                    "connecting and queueing the requests",
                    *_phase_stats(samples, phases["hold_start"], phases["all_waiting"]),
                ],
                [
                    f"{count:,} waiting",
                    *_phase_stats(samples, phases["all_waiting"], phases["drain_start"]),
                ],
                ["draining", *_phase_stats(samples, phases["drain_start"], phases["drain_end"])],
            ],
        ),
        "",
        *_log_lines(outcome.get("gateway_log", [])),
        "The gateway is one single-threaded process: while it accepts and enqueues thousands "
        "of requests, or relays their answers, `/api/tags` waits its turn on the same event "
        "loop, so its latency during the connect and drain phases measures that queueing "
        "rather than the cost of building the tags list.",
    ]
    goals.info(
        f"/api/tags p50 / p99 with {count:,} waiting and {sim_nodes + 1} nodes",
        f"{fmt_ms(percentile(waiting_lat, 50), 1)} / {fmt_ms(percentile(waiting_lat, 99), 1)} ms",
    )
    if smoke:
        md.insert(1, f"\n_Smoke run: {count} requests instead of 10,000._")
    return {
        "name": "scale",
        "markdown": "\n".join(md),
        "summary": goals.rows,
        "data": {
            "rss": rss,
            "per_request_kb": per_kb,
            "outcome": outcome,
            "phases": phases,
            "tags_latency_p50_all_s": statistics.median([s[1] for s in samples if s[2] == 200])
            if samples
            else None,
        },
    }


def _log_lines(problems: list[tuple[str, int]]) -> list[str]:
    if not problems:
        return []
    out = ["The gateway logged (most frequent first, timestamps removed):", ""]
    out += [f"- {n} x `{message}`" for message, n in problems]
    out.append("")
    return out


def main() -> int:
    p = report.parser(__doc__ or "")
    p.add_argument("--probe", help=argparse_hidden())
    p.add_argument("--probe-seconds", type=float, default=60)
    p.add_argument("--probe-out", type=Path)
    args = p.parse_args()
    if args.probe:
        samples = run_uvloop(lambda: probe(args.probe, args.probe_seconds))
        args.probe_out.write_bytes(orjson.dumps(samples))
        return 0
    report.emit(run(args.smoke), args.json)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
