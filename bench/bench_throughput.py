"""Benchmark 2, throughput: requests/s end to end with instant answers.

Closed-loop clients (each sends its next request when the last returns) at 64, 512 and
2,048 concurrent connections against one gateway process; one fake node with 64 slots
and its worker with 64 slots. Errors are counted by kind. CPU per request is read per
process, and py-spy profiles the gateway and the worker under load.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import report
from fleetctl import CpuSampler, FakeSpec, Fleet, raise_nofile
from httpload import LoadResult, closed_loop, fmt_ms, percentile, run_uvloop

MODEL = "bench:latest"
SLOTS = 64
GOAL_RPS, STAGE1_RPS = 2000.0, 1000.0


def body(seq: int) -> bytes:
    return orjson.dumps(
        {"model": MODEL, "prompt": f"p{seq}", "stream": False, "options": {"num_predict": 0}}
    )


def _load(
    url: str,
    concurrency: int,
    duration: float,
    warmup: float,
    sampler: CpuSampler | None = None,
    redis: Any = None,
    commands: dict[str, Any] | None = None,
) -> LoadResult:
    def window(edge: str) -> None:
        # Blocking calls inside the client's loop: a few ms, at the window's edges only.
        if sampler is not None:
            sampler.start() if edge == "start" else sampler.stop()
        if redis is not None and commands is not None:
            if edge == "start":
                redis.config_resetstat()
            else:
                commands.update(redis.info("commandstats"))

    return run_uvloop(  # type: ignore[no-any-return]
        lambda: closed_loop(
            url,
            "/api/generate",
            body,
            concurrency=concurrency,
            duration=duration,
            warmup=warmup,
            time_limit=120,
            drain=60,
            connect_rate=4000,
            on_window=window,
        )
    )


def run(smoke: bool, profile: bool) -> report.Result:
    levels = [64, 512, 2048]
    duration, warmup = (2.0, 1.0) if smoke else (10.0, 3.0)
    prof_s = 3.0 if smoke else 8.0
    raise_nofile()
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    prof_error = ""
    with Fleet("throughput") as fleet:
        fleet.start_redis()
        node = fleet.add_node("n1", FakeSpec(models=[MODEL], num_parallel=SLOTS, max_queue=4096))
        fleet.start_gateway(expect_nodes=1)
        fleet.start_scheduler()
        rclient = fleet.redis_client()
        # Reference: the fake alone, at the concurrency its slots allow.
        ref = _load(node.fake_url, SLOTS, duration, warmup)
        rows.append(_row("direct to fake Ollama (reference)", ref, {}))
        for level in levels:
            sampler = CpuSampler(fleet.processes(), fleet.redis_pid())
            commands: dict[str, Any] = {}
            res = _load(fleet.gateway_url, level, duration, warmup, sampler, rclient, commands)
            used = dict(sampler.used)
            used["client (benchmark)"] = res.client_cpu_s
            rows.append(_row(f"through Corral, {level} clients", res, used))
            rows[-1]["machine_cores"] = sampler.machine_cores
            rows[-1]["redis_commands"] = {
                k.removeprefix("cmdstat_"): {"calls": v["calls"], "usec": v["usec"]}
                for k, v in commands.items()
            }
        if profile:
            assert node.worker is not None and fleet.gateway is not None
            prof = report.Profiler(
                "throughput", {"gateway": fleet.gateway, "worker": node.worker}, prof_s
            )
            if prof.start():
                prof_res = _load(fleet.gateway_url, 512, prof_s, 0.0)
                profiles = prof.finish()
                profiles["_rate"] = prof_res.rate
            else:
                prof_error = prof.error
    return _result(rows, profiles, prof_error, duration, smoke)


def _row(label: str, res: LoadResult, used: dict[str, float]) -> dict[str, Any]:
    return {
        "label": label,
        "concurrency": res.concurrency,
        "rate": res.rate,
        "completed": res.completed,
        "p50": percentile(res.latencies, 50),
        "p99": percentile(res.latencies, 99),
        "errors": dict(res.errors),
        "cpu": used,
        "connected": res.connected,
    }


def _result(
    rows: list[dict[str, Any]],
    profiles: dict[str, Any],
    prof_error: str,
    duration: float,
    smoke: bool,
) -> report.Result:
    table_rows = []
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "none"
        table_rows.append(
            [
                r["label"],
                f"{r['rate']:,.0f}",
                fmt_ms(r["p50"], 1),
                fmt_ms(r["p99"], 1),
                r["completed"],
                errors,
            ]
        )
    top = rows[-1]
    best = max(rows[1:], key=lambda r: r["rate"])
    goals = report.Goals()
    md = [
        "## 2. Throughput (instant answers, closed loop)",
        "",
        f"Each level: {duration:g} s measured after a warm-up; every client keeps one "
        "keep-alive connection and sends its next request when the last returns. "
        f"One gateway process, one fake node with {SLOTS} slots and its worker with "
        f"{SLOTS} slots, scheduler, Redis. Client, Redis, gateway, worker and fake all share "
        "the machine's cores.",
        "",
        report.table(
            ["load", "req/s", "p50 ms", "p99 ms", "answers in window", "errors (whole run)"],
            table_rows,
        ),
        "",
        "Goals:",
        "",
        goals.check(
            "throughput at 2,048 clients", top["rate"], GOAL_RPS, "req/s", lower_is_better=False
        ),
        goals.check(
            "throughput at 2,048 clients (stage-1 goal)",
            top["rate"],
            STAGE1_RPS,
            "req/s",
            lower_is_better=False,
        ),
        goals.count("errors at 2,048 clients", sum(top["errors"].values())),
        *(
            goals.check(
                f"throughput at {r['concurrency']:,} clients (stage-1 goal)",
                r["rate"],
                STAGE1_RPS,
                "req/s",
                lower_is_better=False,
            )
            for r in rows[1:-1]
        ),
        *(
            goals.count(f"errors at {r['concurrency']:,} clients", sum(r["errors"].values()))
            for r in rows[1:-1]
            if r["concurrency"] == 512
        ),
        "",
        f"CPU per request by process at the best level ({best['label']}, "
        f"{best['rate']:,.0f} req/s):",
        "",
        report.cpu_table(best["cpu"], duration, best["completed"]),
        "",
        "### What limits it",
        "",
        *_limits(best, duration),
    ]
    if prof_error:
        md.append(f"_No profile: {prof_error}_")
    cmds = best.get("redis_commands", {})
    if cmds:
        n = max(1, best["completed"])
        md += [
            "Redis commands per request at that level (`INFO commandstats`; the time of "
            "commands run inside a Lua function is also counted under `fcall`):",
            "",
            report.table(
                ["command", "calls per request", "Redis µs per request"],
                [
                    [name, f"{c['calls'] / n:.2f}", f"{c['usec'] / n:.1f}"]
                    for name, c in sorted(cmds.items(), key=lambda kv: -kv[1]["usec"])[:10]
                ],
            ),
            "",
        ]
    rate = profiles.pop("_rate", None)
    if profiles:
        md.append(
            f"Profiles taken with py-spy (200 Hz, non-blocking) during a separate {512}-client "
            f"run ({rate or 0:,.0f} req/s while profiled):"
        )
        md.append("")
    at512 = next((r for r in rows if r["concurrency"] == 512 and r["cpu"]), None)
    for label, summary in profiles.items():
        proc = "worker-n1" if label == "worker" else label
        cpu_us = at512["cpu"].get(proc, 0.0) / max(1, at512["completed"]) * 1e6 if at512 else None
        md += [report.profile_markdown(f"{label} under load", summary, cpu_us=cpu_us), ""]
    if smoke:
        md.insert(1, "\n_Smoke run: seconds-long, numbers are indicative only._")
    return {
        "name": "throughput",
        "markdown": "\n".join(md),
        "summary": goals.rows,
        "data": {"rows": rows, "profiles": profiles},
    }


def _limits(best: dict[str, Any], duration: float) -> list[str]:
    n = max(1, best["completed"])
    cpu = {k: v for k, v in best["cpu"].items() if k != "scheduler"}
    total_ms = sum(cpu.values()) / n * 1e3
    busy = sum(cpu.values()) / duration
    cores = os.cpu_count() or 1
    machine = best.get("machine_cores", float("nan"))
    out = [
        f"- The machine's {cores} cores were {machine:.2f} cores busy during the window: "
        f"{busy:.2f} for this benchmark's processes and {max(0.0, machine - busy):.2f} for "
        "other processes on the machine."
        + (" The CPU was the limit." if machine >= 0.9 * cores else ""),
        f"- All processes together spent {total_ms:.2f} ms of CPU per request and kept "
        f"{busy:.2f} of the machine's {cores} cores busy: on this machine the path cannot "
        f"go much beyond {cores / total_ms * 1e3:,.0f} req/s whatever the concurrency. "
        f"{GOAL_RPS:,.0f} req/s needs at most {cores / GOAL_RPS * 1e3:.2f} ms per request "
        "here (or proportionally more cores).",
    ]
    for name, secs in sorted(cpu.items(), key=lambda kv: -kv[1]):
        if name.startswith("client") or name == "redis":
            continue
        per_ms = secs / n * 1e3
        share = secs / duration
        state = "saturated (one thread, one core)" if share >= 0.85 else "not saturated"
        out.append(
            f"- `{name}`: {per_ms:.2f} ms CPU per request, {share:.2f} cores, {state}; one "
            f"such process cannot pass {1e3 / per_ms:,.0f} req/s even with a core of its own."
        )
    out.append(
        "- Every Corral process is a single-threaded asyncio program, so the one with the "
        "largest CPU per request caps a node (worker) or a gateway process, and the sum caps "
        "the machine. The profiles below show where each spends it."
    )
    out.append("")
    return out


def main() -> int:
    return report.main(__doc__ or "", lambda args: run(args.smoke, not args.no_profile))


if __name__ == "__main__":
    raise SystemExit(main())
