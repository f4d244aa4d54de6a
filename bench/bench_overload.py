"""Benchmark 7, overload: a 3x burst of mixed priorities, with degradation levels on and off.

The same seeded burst is replayed against two fresh fleets that differ only in
``--levels`` / ``--no-levels`` on the scheduler: open-loop arrivals at three times what
the fleet's slots can serve, for a fixed time, each request a ``stream: false``
``/api/generate`` with a fixed ``num_predict``, an ``X-Corral-Priority`` drawn from a mix
(20% priority 0, 40% priority 5, 40% priority 9) and an ``X-Corral-Timeout``.

With levels on, the scheduler's level rises with the backlog: priority 5 and 9 get
``num_predict`` capped (level 1), priority 9 is refused with 503 and a Retry-After at
level 3, and requests whose timeout the measured queue cannot meet are refused at once.
With levels off the scheduler still publishes drain rates (level 0), so only the
timeout admission acts.

Reported per run and priority: requests, answered, refused at once (503), timed out
(504), other failures, degraded answers, p50/p99 queue wait (the job record's
``started - created``, Redis time) and the mean job time (``finished - started``);
and the levels the gateway saw during the burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
import report
from fleetctl import FakeSpec, Fleet, raise_nofile
from httpload import Connection, HttpError, fmt_s, percentile, run_uvloop
from redis.asyncio import Redis

from corral import keys
from corral.load import LoadReport

MODEL = "bench:latest"
MIX = [(0, 0.2), (5, 0.4), (9, 0.4)]
SEED = 20261129


@dataclass(frozen=True)
class Shape:
    nodes: int
    slots: int
    token_rate: float
    tokens: int
    cap: int
    burst_s: float
    timeout_s: float

    @property
    def job_s(self) -> float:
        return self.tokens / self.token_rate

    @property
    def capacity(self) -> float:
        return self.nodes * self.slots / self.job_s

    @property
    def arrival_rate(self) -> float:
        return 3 * self.capacity


FULL = Shape(nodes=2, slots=2, token_rate=40, tokens=20, cap=5, burst_s=20, timeout_s=10)
SMOKE = Shape(nodes=1, slots=2, token_rate=40, tokens=10, cap=3, burst_s=4, timeout_s=5)


@dataclass
class Sent:
    priority: int
    at: float
    status: int = 0
    error: str = ""
    job_id: str = ""
    degraded: str = ""
    retry_after: str = ""


def _plan(shape: Shape) -> list[Sent]:
    rng = random.Random(SEED)
    count = int(shape.arrival_rate * shape.burst_s)
    prios = [p for p, _ in MIX]
    weights = [w for _, w in MIX]
    return [Sent(rng.choices(prios, weights)[0], i / shape.arrival_rate) for i in range(count)]


async def _send(url: str, shape: Shape, sent: Sent, index: int) -> None:
    body = orjson.dumps(
        {
            "model": MODEL,
            "prompt": f"job {index}",
            "stream": False,
            "options": {"num_predict": shape.tokens},
        }
    )
    headers = [
        ("x-corral-priority", str(sent.priority)),
        ("x-corral-timeout", f"{shape.timeout_s:g}"),
    ]
    conn = Connection(url)
    try:
        resp = await conn.request(
            "POST", "/api/generate", body, headers=headers, time_limit=shape.timeout_s + 60
        )
    except HttpError as exc:
        sent.error = exc.kind
        return
    finally:
        conn.close()
    sent.status = resp.status
    sent.job_id = resp.headers.get(b"x-corral-job-id", b"").decode()
    sent.degraded = resp.headers.get(b"x-corral-degraded", b"").decode()
    sent.retry_after = resp.headers.get(b"retry-after", b"").decode()


async def _watch_levels(
    redis_url: str, stop: asyncio.Event, seen: list[tuple[float, LoadReport]]
) -> None:
    client = Redis.from_url(redis_url)
    t0 = time.monotonic()
    try:
        while not stop.is_set():
            seen.append((time.monotonic() - t0, LoadReport.decode(await client.get(keys.LOAD))))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    finally:
        await client.aclose()


async def _burst(fleet: Fleet, shape: Shape) -> dict[str, Any]:
    plan = _plan(shape)
    stop = asyncio.Event()
    levels: list[tuple[float, LoadReport]] = []
    watcher = asyncio.create_task(_watch_levels(fleet.redis_url, stop, levels))
    t0 = time.monotonic()

    async def at(sent: Sent, index: int) -> None:
        await asyncio.sleep(max(0.0, t0 + sent.at - time.monotonic()))
        await _send(fleet.gateway_url, shape, sent, index)

    await asyncio.gather(*(at(sent, i) for i, sent in enumerate(plan)))
    wall = time.monotonic() - t0
    settle = time.monotonic() + 30
    while time.monotonic() < settle and (not levels or levels[-1][1].level):  # noqa: ASYNC110
        await asyncio.sleep(0.25)  # the watcher's own period: how long the level takes to fall
    stop.set()
    await watcher
    records = await _records(fleet.redis_url, [s.job_id for s in plan if s.job_id])
    return {"plan": plan, "records": records, "levels": levels, "wall": wall}


async def _records(redis_url: str, job_ids: list[str]) -> dict[str, tuple[float, ...]]:
    client = Redis.from_url(redis_url)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.job(job_id), "created", "started", "finished")
            rows = await pipe.execute()
    finally:
        await client.aclose()
    out: dict[str, tuple[float, ...]] = {}
    for job_id, row in zip(job_ids, rows, strict=True):
        out[job_id] = tuple(float(v) if v not in (None, b"", b"0.0") else 0.0 for v in row)
    return out


def run_one(shape: Shape, levels_on: bool) -> dict[str, Any]:
    name = "overload-" + ("on" if levels_on else "off")
    with Fleet(name, common=["--node-ttl", "3"]) as fleet:
        fleet.start_redis()
        spec = FakeSpec(
            models=[MODEL], num_parallel=shape.slots, token_rate=shape.token_rate, max_queue=4096
        )
        for n in range(shape.nodes):
            fleet.add_node(f"n{n + 1}", spec)
        fleet.start_gateway(
            [
                "--fleet-refresh", "0.25",
                "--degrade-num-predict", str(shape.cap),
                "--result-ttl", "600",
                "--job-ttl", "600",
            ],
            expect_nodes=shape.nodes,
        )  # fmt: skip
        fleet.start_scheduler(
            [
                "--interval", "0.25",
                "--drain-window", "10",
                "--load-ttl", "3",
                "--levels" if levels_on else "--no-levels",
            ]
        )  # fmt: skip
        time.sleep(1.0)  # the scheduler's first passes: a level 0 report is out
        return run_uvloop(lambda: _burst(fleet, shape))


def _summarise(raw: dict[str, Any]) -> dict[str, Any]:
    plan: list[Sent] = raw["plan"]
    records: dict[str, tuple[float, ...]] = raw["records"]
    per: dict[int, dict[str, Any]] = {}
    all_jobs: list[float] = []
    for prio, _ in MIX:
        mine = [s for s in plan if s.priority == prio]
        ok = [s for s in mine if s.status == 200]
        waits, jobs = [], []
        for s in ok:
            created, started, finished = records.get(s.job_id, (0.0, 0.0, 0.0))
            if created and started:
                waits.append(started - created)
            if started and finished:
                jobs.append(finished - started)
        all_jobs += jobs
        per[prio] = {
            "sent": len(mine),
            "ok": len(ok),
            "refused_503": sum(1 for s in mine if s.status in (429, 503)),
            "timed_out_504": sum(1 for s in mine if s.status == 504),
            "other_failures": sum(1 for s in mine if s.status not in (200, 429, 503, 504)),
            "degraded": sum(1 for s in ok if s.degraded),
            "wait_p50_s": percentile(waits, 50),
            "wait_p99_s": percentile(waits, 99),
            "job_mean_s": sum(jobs) / len(jobs) if jobs else float("nan"),
            "retry_after": sorted({s.retry_after for s in mine if s.retry_after}),
        }
    levels: list[tuple[float, LoadReport]] = raw["levels"]
    return {
        "per_priority": per,
        "job_mean_s": sum(all_jobs) / len(all_jobs) if all_jobs else float("nan"),
        "max_level": max((r.level for _, r in levels), default=0),
        "level_trace": [(round(t, 2), r.level, round(r.load, 2)) for t, r in levels],
        "wall_s": raw["wall"],
    }


def run(smoke: bool) -> report.Result:
    raise_nofile()
    shape = SMOKE if smoke else FULL
    runs = {
        "levels on": _summarise(run_one(shape, True)),
        "levels off": _summarise(run_one(shape, False)),
    }
    rows = []
    for label, res in runs.items():
        for prio, fig in res["per_priority"].items():
            rows.append(
                [
                    label, prio, fig["sent"], fig["ok"], fig["refused_503"],
                    fig["timed_out_504"], fig["other_failures"], fig["degraded"],
                    fmt_s(fig["wait_p50_s"]), fmt_s(fig["wait_p99_s"]),
                    fmt_s(fig["job_mean_s"]),
                    ", ".join(fig["retry_after"][:6]) or "-",
                ]
            )  # fmt: skip
    on, off = runs["levels on"], runs["levels off"]
    goals = report.Goals()
    md = [
        "## 7. Overload: a 3x burst of mixed priorities, levels on and off",
        "",
        f"{shape.nodes} fake node(s) x {shape.slots} slots, {shape.tokens} tokens per job at "
        f"{shape.token_rate:g} tokens/s (a {shape.job_s:g} s job; capacity "
        f"{shape.capacity:g} jobs/s). Open-loop arrivals at {shape.arrival_rate:g} jobs/s "
        f"(3x) for {shape.burst_s:g} s, priorities 0 / 5 / 9 drawn 20 / 40 / 40 %, each "
        f"with `X-Corral-Timeout: {shape.timeout_s:g}`. Levels on: default thresholds, "
        f"`--degrade-num-predict {shape.cap}`, scheduler pass 0.25 s, gateway refresh "
        "0.25 s. Levels off: `--no-levels` (drain rates still published, so requests "
        "whose timeout cannot be met are still refused at once). Queue wait and job time "
        "come from the job records (Redis time).",
        "",
        report.table(
            [
                "run",
                "priority",
                "sent",
                "answered",
                "refused 503",
                "timed out 504",
                "other failures",
                "degraded",
                "wait p50 s",
                "wait p99 s",
                "mean job s",
                "Retry-After seen",
            ],
            rows,
        ),
        "",
        f"Highest level seen: {on['max_level']} with levels on, {off['max_level']} with "
        f"levels off. Mean job time of everything answered: {fmt_s(on['job_mean_s'])} s "
        f"(on), {fmt_s(off['job_mean_s'])} s (off); a priority-0 job alone "
        f"{fmt_s(on['per_priority'][0]['job_mean_s'])} s (on).",
        "",
        "Goals (levels on):",
        "",
    ]
    p0 = on["per_priority"][0]
    reference = p0["job_mean_s"]
    md.append(
        goals.check(
            "overload: priority-0 p99 queue wait (levels on), in priority-0 job times",
            p0["wait_p99_s"] / reference if not math.isnan(reference) else math.nan,
            1.0,
            "x",
            lower_is_better=True,
        )
    )
    failed0 = p0["sent"] - p0["ok"]
    md.append(goals.count("overload: priority-0 failures (levels on)", failed0))
    goals.info(
        "overload: levels off, priority 0 / 5 / 9 answered",
        " / ".join(f"{f['ok']} of {f['sent']}" for f in off["per_priority"].values())
        + f"; p0 wait p99 {fmt_s(off['per_priority'][0]['wait_p99_s'])} s",
    )
    md += [
        "",
        f"Level trace with levels on (seconds from the start of the {shape.burst_s:g} s burst "
        "until the level is back to 0: level, load), as published in Redis:",
        "",
    ]
    trace = on["level_trace"]
    changes = [t for i, t in enumerate(trace) if i == 0 or t[1] != trace[i - 1][1]]
    md.append(", ".join(f"{t:g} s: {lvl} ({load:g})" for t, lvl, load in changes) or "-")
    if smoke:
        md.insert(1, "\n_Smoke run: a seconds-long burst, too short for stable figures._")
    return {
        "name": "overload",
        "markdown": "\n".join(md),
        "summary": goals.rows,
        "data": {"shape": shape.__dict__, "runs": runs},
    }


def main() -> int:
    return report.main(__doc__ or "", lambda args: run(args.smoke))


if __name__ == "__main__":
    raise SystemExit(main())
