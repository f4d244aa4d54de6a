"""Benchmark 3, scale: 10,000 waiting requests on one gateway, 100 nodes heartbeating.

Phases, with one gateway process:

1. idle: 100 simulated nodes heartbeat every 2 s (``bench/sim_nodes.py``); the gateway's
   ``/api/tags`` latency is probed; gateway RSS is read after a short warm-up.
2. hold: 10,000 clients, each with its own connection, send a slow generate (the fake
   node gives 1 token/s, every request asks for 30 tokens, 64 slots), 500 a second:
   almost all of them wait in the queue. RSS is read once they are all waiting.
3. drain: the fake is switched to instant answers (``POST /_fake/config``) and every
   request must come back 200. Waits are bounded: a request the system loses is counted,
   it does not stall the benchmark.

``/api/tags`` is probed from a separate process throughout (about 10 per second). Then
the same 10,000 requests are sent all at once to a fresh fleet, to see what a burst does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import report
from fleetctl import OUT_DIR, FakeSpec, Fleet, Proc, raise_nofile
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

from corral import keys

MODEL = "bench:latest"
SLOTS = 64
TOKENS = 30  # 30 s per answer at 1 token/s: about 2 answers a second while they wait
RAMP = 500.0  # requests sent per second until all are out
STALL_S = 10.0  # a drain that returns nothing for this long is over
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


async def _heartbeat_monitor(
    redis_url: str, gateway_id: str, stop: asyncio.Event, out: dict[str, float]
) -> None:
    """Largest age seen of the gateway's own heartbeat (its score in ``corral:gateways``)."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        while not stop.is_set():
            seen = await client.zscore(keys.GATEWAYS, gateway_id)
            age = time.time() - float(seen) if seen is not None else float("inf")
            out["max_age"] = max(out.get("max_age", 0.0), age)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await stop.wait()
    finally:
        await client.aclose()


def _stats(fleet: Fleet) -> dict[str, int]:
    client = fleet.redis_client()
    try:
        return {k.decode(): int(v) for k, v in client.hgetall(keys.STATS).items()}
    finally:
        client.close()


async def hold_and_drain(
    fleet: Fleet,
    count: int,
    ramp_rate: float | None,
    phases: dict[str, float],
    rss: dict[str, Any],
) -> dict[str, Any]:
    """``count`` slow requests (spread at ``ramp_rate``/s, or all at once), then a drain."""
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
    stats_before = _stats(fleet)
    gateway_id = str((await get_json(fleet.gateway_url + "/healthz"))["gateway"])
    beat: dict[str, float] = {}
    stop_monitor = asyncio.Event()
    monitor = asyncio.create_task(
        _heartbeat_monitor(fleet.redis_url, gateway_id, stop_monitor, beat)
    )
    rss["before"] = gw.rss()
    phases["hold_start"] = time.time()

    conns = await open_connections(fleet.gateway_url, count, per_second=2500, errors=errors)
    rss["after_connect"] = gw.rss()
    t_send = time.perf_counter()

    async def one(i: int, conn: Connection) -> None:
        nonlocal ok
        if ramp_rate:
            await asyncio.sleep(max(0.0, t_send + i / ramp_rate - time.perf_counter()))
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
    # Until every request is waiting, answered or failed, then a few seconds of steady
    # state. Bounded: a request the system loses must not stall the benchmark.
    waiting = 0
    deadline = time.monotonic() + (len(conns) / ramp_rate if ramp_rate else 0) + 60
    while time.monotonic() < deadline:
        health = await get_json(fleet.gateway_url + "/healthz", time_limit=60)
        waiting = int(health.get("waiting", 0))
        if waiting + ok + sum(errors.values()) >= len(conns):
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
    # Drain until everything is answered, or nothing more comes back for STALL_S.
    pending = set(tasks)
    last_progress = time.monotonic()
    while pending and time.monotonic() - last_progress < STALL_S:
        done, pending = await asyncio.wait(pending, timeout=1.0)
        if done:
            last_progress = time.monotonic()
    drain_s = time.perf_counter() - t0 - (time.monotonic() - last_progress if pending else 0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    phases["drain_end"] = time.time()
    stop_monitor.set()
    await monitor
    for c in conns:
        c.close()
    await asyncio.sleep(1.0)
    rss["after"] = gw.rss()
    stats_after = _stats(fleet)
    return {
        "ok": ok,
        "errors": dict(errors),
        "unanswered": len(pending),
        "drain_s": drain_s,
        "connected": len(conns),
        "heartbeat_max_age_s": beat.get("max_age", float("nan")),
        "queue_stats": {k: v - stats_before.get(k, 0) for k, v in stats_after.items()},
        "gateway_id": gateway_id,
    }


def _sim_and_probe(fleet: Fleet, sim_nodes: int, probe_file: Path) -> Proc:
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
    report.wait_until(lambda: int(registry.zcard(keys.NODES)) >= sim_nodes + 1, 20)
    registry.close()
    return fleet.spawn(
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


def _fleet(name: str, count: int) -> Fleet:
    fleet = Fleet(name)
    try:
        fleet.start_redis()
        fleet.add_node(
            "n1", FakeSpec(models=[MODEL], num_parallel=SLOTS, max_queue=4096, token_rate=1.0)
        )
        fleet.start_gateway(["--max-queue", str(count * 2)], expect_nodes=1)
        fleet.start_scheduler()
    except BaseException:
        fleet.stop()
        raise
    return fleet


def run(smoke: bool) -> report.Result:
    count = 500 if smoke else 10_000
    sim_nodes = 100
    limit = raise_nofile(65536)
    phases: dict[str, float] = {}
    rss: dict[str, Any] = {}
    probe_file = OUT_DIR / "scale-probe.json"
    probe_file.parent.mkdir(parents=True, exist_ok=True)
    probe_file.unlink(missing_ok=True)
    with _fleet("scale", count) as fleet:
        prober = _sim_and_probe(fleet, sim_nodes, probe_file)
        time.sleep(1.0)
        phases["idle_start"] = time.time()
        time.sleep(3.0 if smoke else 5.0)
        outcome = run_uvloop(lambda: hold_and_drain(fleet, count, RAMP, phases, rss))
        time.sleep(2.0)
        phases["end"] = time.time()
        prober.terminate()  # it writes its samples and exits
        prober.wait(10)
        fleet.wait_gateway_nodes(sim_nodes + 1)  # the registry still holds every node
        assert fleet.gateway is not None
        outcome["gateway_log"] = fleet.gateway.log_problems()
    samples = orjson.loads(probe_file.read_bytes()) if probe_file.exists() else []
    # The same requests all at once, on a fresh fleet: what a burst does to the gateway.
    burst_phases: dict[str, float] = {}
    burst_rss: dict[str, Any] = {}
    with _fleet("scale-burst", count) as fleet:
        burst = run_uvloop(lambda: hold_and_drain(fleet, count, None, burst_phases, burst_rss))
        assert fleet.gateway is not None
        burst["gateway_log"] = fleet.gateway.log_problems()
        burst["rss"] = burst_rss
    return _result(count, sim_nodes, outcome, rss, phases, samples, limit, burst, smoke)


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
    burst: dict[str, Any],
    smoke: bool,
) -> report.Result:
    held = max(1, rss["waiting_seen"])
    per_kb = (rss["during"] - rss["before"]) / held / 1024
    conn_kb = (rss["after_connect"] - rss["before"]) / max(1, outcome["connected"]) / 1024
    mib = 2**20
    errors = dict(outcome["errors"])
    if outcome["unanswered"]:
        errors[f"no answer (nothing came back for {STALL_S:g} s)"] = outcome["unanswered"]
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
        f"one gateway process, {RAMP:,.0f} requests a second until all are out "
        f"(fake node: {SLOTS} slots at 1 token/s, {TOKENS} tokens per "
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
                    "drain time (after the switch to instant answers)",
                    f"{outcome['drain_s']:.1f} s",
                ],
                [
                    "largest age of the gateway's own heartbeat seen",
                    f"{outcome['heartbeat_max_age_s']:.1f} s",
                ],
                ["queue counters during the run (`corral:stats`)", _counters(outcome)],
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
        "",
        *_burst_lines(count, burst),
    ]
    goals.info(
        f"{count:,} requests sent at once",
        f"{burst['ok']:,} answered, {burst['unanswered']:,} unanswered, "
        f"{sum(burst['errors'].values()):,} errors",
    )
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
            "burst": burst,
            "phases": phases,
            "tags_latency_p50_all_s": statistics.median([s[1] for s in samples if s[2] == 200])
            if samples
            else None,
        },
    }


def _counters(outcome: dict[str, Any]) -> str:
    stats = outcome.get("queue_stats", {})
    return ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items()) if v) or "none"


def _burst_lines(count: int, burst: dict[str, Any]) -> list[str]:
    errors = dict(burst["errors"])
    if burst["unanswered"]:
        errors[f"no answer (nothing came back for {STALL_S:g} s)"] = burst["unanswered"]
    err_text = ", ".join(f"{k}: {v:,}" for k, v in sorted(errors.items())) or "none"
    orphaned = int(burst.get("queue_stats", {}).get("orphaned", 0))
    age = burst["heartbeat_max_age_s"]
    age_text = (
        "more than the node ttl: the scheduler pruned the gateway from `corral:gateways`"
        if math.isinf(age)
        else f"{age:.1f} s"
    )
    out = [
        f"### The same {count:,} requests sent all at once",
        "",
        "A fresh fleet (no simulated nodes); the clients connect at 2,500 a second and then "
        "send every request at the same moment.",
        "",
        report.table(
            ["measure", "value"],
            [
                ["answers 200", f"{burst['ok']:,} of {count:,}"],
                ["errors", err_text],
                ["largest age of the gateway's own heartbeat seen", age_text],
                ["queue counters during the run (`corral:stats`)", _counters(burst)],
            ],
        ),
        "",
        *_log_lines(burst.get("gateway_log", [])),
    ]
    if orphaned:
        out += [
            f"**{orphaned:,} queued jobs were cancelled as orphans** while the gateway that "
            "queued them was alive and its clients were waiting. Enqueueing the burst keeps "
            "the gateway's event loop and its Redis pool busy for seconds; its heartbeat in "
            "`corral:gateways` (written by the fleet-view loop every second) went stale "
            "beyond the node ttl"
            + (
                ", so that the scheduler even pruned it from the registry"
                if math.isinf(age)
                else ""
            )
            + ", and the claim script (`corral/lua/claim.lua`) cancels every "
            "queued job of a gateway it considers gone, in one call, without publishing "
            "anything on the gateway's reply channel: those clients get no answer until "
            "their request timeout.",
            "",
        ]
    return out


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
