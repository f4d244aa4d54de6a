"""Run Corral's benchmarks and write bench/RESULTS.md.

    python bench/run_all.py                  # everything (about 10-15 minutes)
    python bench/run_all.py --smoke          # seconds-long versions, for CI
    python bench/run_all.py --only overhead --only streaming

Each benchmark runs as its own process (``bench/bench_<name>.py``), which starts its own
Redis, fake Ollama nodes, workers, gateway and scheduler as separate processes and tears
them down. Its result lands in ``bench/results/<name>.json``; RESULTS.md is rendered from
every result file there, so ``--only`` refreshes some sections and keeps the others.
A smoke run writes to ``bench/out/`` instead and leaves RESULTS.md alone.
No benchmark asserts on timings: they report, and a failed benchmark is reported too.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import psutil

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import report  # noqa: E402 - after the path set-up above
from fleetctl import OUT_DIR  # noqa: E402

BENCHMARKS = {
    "overhead": ("bench_overhead.py", 240, 420),
    "throughput": ("bench_throughput.py", 240, 420),
    "scale": ("bench_scale.py", 240, 420),
    "scheduling": ("bench_scheduling.py", 420, 900),
    "recovery": ("bench_recovery.py", 240, 420),
    "streaming": ("bench_streaming.py", 240, 420),
    "overload": ("bench_overload.py", 240, 420),
    "cache": ("bench_cache.py", 240, 600),
    "placement": ("bench_placement.py", 300, 600),
}
"""name -> (script, smoke timeout s, full timeout s)"""

RESULTS_DIR = BENCH_DIR / "results"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _busy_cpu() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def wait_for_quiet(limit_s: float, threshold: float = 0.3) -> tuple[float, float]:
    """Wait (at most ``limit_s``) until other processes use under ``threshold`` cores.

    The machine may be shared; starting a benchmark while something else is busy skews it.
    Returns (seconds waited, cores busy in the last second looked at).
    """
    started = time.monotonic()
    while True:
        before = _busy_cpu()
        time.sleep(1.0)
        busy = _busy_cpu() - before
        waited = time.monotonic() - started
        if busy < threshold or waited >= limit_s:
            return waited, busy


def run_one(
    name: str, smoke: bool, extra: list[str], out_dir: Path, quiet_s: float
) -> dict[str, Any]:
    script, smoke_limit, full_limit = BENCHMARKS[name]
    out_json = out_dir / f"{name}.json"
    out_json.unlink(missing_ok=True)
    log = OUT_DIR / "logs" / f"{name}{'-smoke' if smoke else ''}.run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(BENCH_DIR / script), "--json", str(out_json), *extra]
    if smoke:
        argv.append("--smoke")
    print(f"== {name}: {' '.join(argv[1:])}", flush=True)
    waited, busy_before = wait_for_quiet(quiet_s) if quiet_s > 0 else (0.0, float("nan"))
    load_before = os.getloadavg()[0]
    busy0, ours0, t0 = _busy_cpu(), _children_cpu(), time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        try:
            code: int | str = proc.wait(timeout=smoke_limit if smoke else full_limit)
        except subprocess.TimeoutExpired:
            code = "timeout"
            _stop(proc)
        except BaseException:
            _stop(proc)
            raise
    wall = time.monotonic() - t0
    # Other processes on the machine: all busy CPU minus ours (the benchmark and every
    # process it started, which it waited for, so their CPU is in our children's usage).
    other = max(0.0, (_busy_cpu() - busy0) - (_children_cpu() - ours0)) / wall
    meta = {
        "wall_s": wall,
        "exit": code,
        "load_before": load_before,
        "busy_before": busy_before,
        "waited_for_quiet_s": waited,
        "other_cores": other,
        "log": str(log.relative_to(BENCH_DIR)),
    }
    if code == 0 and out_json.exists():
        result: dict[str, Any] = orjson.loads(out_json.read_bytes())
    else:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        result = {
            "name": name,
            "markdown": f"## {name}\n\n**The benchmark failed** (exit: {code}). "
            f"Last lines of its output:\n\n```\n{tail}\n```",
            "summary": [{"metric": name, "value": "failed", "goal": "-", "status": "failed"}],
            "data": {},
        }
    result["meta"] = meta
    out_json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"   {name}: exit {code} in {wall:.0f} s", flush=True)
    return result


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the benchmark unwinds and stops its fleet), then SIGKILL after a minute."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f}"


def render(results: dict[str, dict[str, Any]], run_info: dict[str, Any]) -> str:
    m = run_info["machine"]
    lines = [
        "# Corral benchmarks",
        "",
        "Rewritten by `bench/run_all.py` (`make bench`); do not edit by hand. Each section "
        "is produced by `bench/bench_<name>.py`, which starts Redis, fake Ollama nodes "
        "(`corral fake-ollama`), one `corral worker` per node, a `corral gateway` and a "
        "`corral scheduler`, each as its own process; the load client runs in the benchmark's "
        "process. "
        "The raw numbers are in `bench/results/*.json`. Nothing here asserts on timings.",
        "",
        f"- Run: {run_info['date']}, command `{run_info['command']}`, "
        f"{run_info['wall_s'] / 60:.1f} minutes",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
        f"Python {m['python']}, Redis {m['redis']}",
        f"- **All processes share the machine's {m['cores']} cores**: the load client, Redis, "
        "the gateway, the workers, the fake Ollama nodes and the scheduler. Every number "
        "below includes that contention; a real deployment puts Ollama, the workers and the "
        "gateway on different machines.",
        "- Corral processes run with `--log-level WARNING` (the default INFO writes lines per "
        "job). The gateway runs one uvicorn process on uvloop with httptools.",
        "",
        "## Summary",
        "",
    ]
    rows = []
    for name, res in results.items():
        for row in res.get("summary", []):
            rows.append([name, row["metric"], row["value"], row["goal"], row["status"]])
    lines.append(report.table(["benchmark", "metric", "measured", "goal", "status"], rows))
    lines += [
        "",
        "Run conditions per benchmark. The machine may be shared: before each benchmark the "
        "runner waits (up to a limit) for other processes to go quiet, and it reports the "
        "CPU other processes used while the benchmark ran (all busy CPU minus the "
        "benchmark's own processes). Numbers taken while others used a sizeable share of "
        "the cores are pessimistic.",
        "",
    ]
    cond = []
    for name, res in results.items():
        meta = res.get("meta", {})
        cond.append(
            [
                name,
                meta.get("date", run_info["date"]),
                f"{meta.get('wall_s', 0):.0f} s",
                f"{meta.get('waited_for_quiet_s', 0):.0f} s",
                _num(meta.get("busy_before")),
                f"{meta.get('other_cores', 0):.2f}",
                meta.get("exit", "?"),
            ]
        )
    lines.append(
        report.table(
            [
                "benchmark",
                "run at",
                "took",
                "waited for a quiet machine",
                "cores busy just before",
                "cores used by other processes meanwhile",
                "exit",
            ],
            cond,
        )
    )
    lines.append("")
    for res in results.values():
        lines += [res["markdown"], ""]
    lines += hand_written(BENCH_DIR / "RESULTS.md")
    return "\n".join(lines).rstrip() + "\n"


HAND_WRITTEN = re.compile(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", re.DOTALL)
"""A block of RESULTS.md written by hand (the chaos run, a before-and-after comparison):
kept as it is when the file is rendered again."""


def hand_written(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [block.group(0) + "\n" for block in HAND_WRITTEN.finditer(path.read_text())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds-long versions (for CI)")
    p.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run only this (repeatable)"
    )
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="seconds to wait at most, before each benchmark, for other processes to go "
        "quiet (default 20, 0 with --smoke)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --smoke: run this many benchmarks at once (their timings then mean "
        "nothing, which smoke runs never claim; full runs are always one at a time)",
    )
    args = p.parse_args(argv)
    if args.jobs < 1 or (args.jobs > 1 and not args.smoke):
        p.error("--jobs above 1 is for --smoke runs only: a full run needs the machine to itself")
    quiet_s = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.smoke else 20.0)
    names = args.only or list(BENCHMARKS)
    extra = ["--no-profile"] if args.no_profile else []
    out_dir = OUT_DIR / "smoke" if args.smoke else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python bench/run_all.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    started = time.monotonic()
    date = report.now_utc()
    failed = []
    budget = 3 * quiet_s  # waiting for quiet must not push a full run past 15 minutes

    def one(name: str, wait_s: float) -> dict[str, Any]:
        res = run_one(name, args.smoke, extra, out_dir, wait_s)
        res["meta"]["date"] = date
        res["meta"]["command"] = command.strip()
        (out_dir / f"{name}.json").write_bytes(
            orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        )
        return res

    if args.jobs > 1:
        # Longest first, so the last to start is a short one; nothing waits for quiet.
        longest = sorted(names, key=lambda n: -BENCHMARKS[n][1])
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            done = dict(zip(longest, pool.map(lambda n: one(n, 0.0), longest), strict=True))
        failed = [name for name in names if done[name]["meta"]["exit"] != 0]
    else:
        for name in names:
            res = one(name, min(quiet_s, max(0.0, budget)))
            budget -= res["meta"]["waited_for_quiet_s"]
            if res["meta"]["exit"] != 0:
                failed.append(name)
    # Every result there is, in the benchmarks' order (older ones kept by --only runs).
    results = {}
    for name in BENCHMARKS:
        path = out_dir / f"{name}.json"
        if path.exists():
            results[name] = orjson.loads(path.read_bytes())
    run_info = {
        "date": date,
        "command": command.strip(),
        "wall_s": time.monotonic() - started,
        "machine": report.machine(),
    }
    target = OUT_DIR / "RESULTS-smoke.md" if args.smoke else BENCH_DIR / "RESULTS.md"
    target.write_text(render(results, run_info))
    print(f"wrote {target.relative_to(BENCH_DIR.parent)}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
