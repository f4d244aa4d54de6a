"""Benchmark 6, streaming: time to first token added by Corral, and tokens/s for 100 streams.

1. TTFT: streamed generates (fake at 50 tokens/s, 3 tokens each), one at a time,
   alternating direct to the fake and through Corral; time from the request to the
   first token line.
2. 100 concurrent streams, each client starting its next generate (100 tokens) as soon
   as the last ends, at 50 tokens/s per stream (5,000 tokens/s offered) and with
   instant tokens (as fast as the path goes); tokens/s received, direct and through
   Corral. One fake node with 100 slots and its worker with 100 slots.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import report
from fleetctl import CpuSampler, FakeSpec, Fleet, raise_nofile
from httpload import Connection, HttpError, fmt_ms, percentile, post_json, run_uvloop

MODEL = "bench:latest"
STREAMS = 100
RATE = 50.0
TTFT_TOKENS = 3


@dataclass
class StreamStats:
    ttft: list[float] = field(default_factory=list)
    tokens_in_window: int = 0
    streams_done: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    gaps_max: list[float] = field(default_factory=list)


async def stream_once(
    conn: Connection, tokens: int, prompt: str, window: tuple[float, float] | None = None
) -> tuple[float, int, int, float]:
    """One streamed generate: (ttft s, tokens, tokens inside the window, longest gap s)."""
    body = orjson.dumps(
        {"model": MODEL, "prompt": prompt, "stream": True, "options": {"num_predict": tokens}}
    )
    buf = bytearray()
    first = 0.0
    count = 0
    in_window = 0
    last = 0.0
    gap = 0.0
    error = ""

    def on_body(chunk: bytes) -> None:
        nonlocal first, count, in_window, last, gap, error
        now = time.perf_counter()
        buf.extend(chunk)
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if not line.strip():
                continue
            obj = orjson.loads(line)
            if "error" in obj:
                error = "error line"
                continue
            if obj.get("done"):
                continue
            if not first:
                first = now
            elif last:
                gap = max(gap, now - last)
            last = now
            count += 1
            if window is not None and window[0] <= now <= window[1]:
                in_window += 1

    started = time.perf_counter()
    resp = await conn.request("POST", "/api/generate", body, on_body=on_body, time_limit=120)
    if resp.status != 200:
        raise HttpError(f"http-{resp.status}")
    if error:
        raise HttpError(error)
    if count != tokens:
        raise HttpError("short stream", f"{count} of {tokens} tokens")
    return first - started, count, in_window, gap


async def ttft_pairs(fake_url: str, gateway_url: str, count: int) -> dict[str, list[float]]:
    direct, full = Connection(fake_url), Connection(gateway_url)
    out: dict[str, list[float]] = {"direct": [], "corral": []}
    for i in range(count + 10):
        order = ((direct, "direct"), (full, "corral"))
        if i % 2:
            order = order[::-1]
        for conn, label in order:
            ttft, *_ = await stream_once(conn, TTFT_TOKENS, f"ttft {i}")
            if i >= 10:  # the first ten warm up
                out[label].append(ttft)
    direct.close()
    full.close()
    return out


async def concurrent_streams(
    url: str, duration: float, warmup: float, on_window: Any = None
) -> StreamStats:
    stats = StreamStats()
    t0 = time.perf_counter()
    window = (t0 + warmup, t0 + warmup + duration)
    conns = [Connection(url) for _ in range(STREAMS)]
    for c in conns:
        await c.connect()

    async def client(i: int, conn: Connection) -> None:
        n = 0
        while time.perf_counter() < window[1]:
            n += 1
            try:
                ttft, _, in_window, gap = await stream_once(conn, 100, f"s{i}-{n}", window)
            except HttpError as exc:
                stats.errors[exc.kind] = stats.errors.get(exc.kind, 0) + 1
                continue
            stats.tokens_in_window += in_window
            stats.streams_done += 1
            if time.perf_counter() >= window[0]:
                stats.ttft.append(ttft)
                stats.gaps_max.append(gap)

    async def clock() -> None:
        await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
        if on_window:
            on_window("start")
        await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
        if on_window:
            on_window("end")

    await asyncio.gather(clock(), *(client(i, c) for i, c in enumerate(conns)))
    for c in conns:
        c.close()
    return stats


def run(smoke: bool) -> report.Result:
    raise_nofile()
    pairs = 30 if smoke else 200
    duration, warmup = (3.0, 1.0) if smoke else (8.0, 2.0)
    loads: list[dict[str, Any]] = []
    with Fleet("streaming") as fleet:
        fleet.start_redis()
        node = fleet.add_node(
            "n1", FakeSpec(models=[MODEL], num_parallel=STREAMS, token_rate=RATE, max_queue=4096)
        )
        fleet.start_gateway(expect_nodes=1)
        fleet.start_scheduler()
        ttft = run_uvloop(lambda: ttft_pairs(node.fake_url, fleet.gateway_url, pairs))
        for rate in (RATE, 0.0):
            run_uvloop(
                lambda rate=rate: post_json(node.fake_url + "/_fake/config", {"token_rate": rate})
            )
            for label, url in (("direct", node.fake_url), ("corral", fleet.gateway_url)):
                sampler = CpuSampler(fleet.processes(), fleet.redis_pid())

                def edge(e: str, s: CpuSampler = sampler) -> None:
                    s.start() if e == "start" else s.stop()

                res = run_uvloop(
                    lambda url=url, edge=edge: concurrent_streams(url, duration, warmup, edge)
                )
                loads.append(
                    {
                        "rate": rate,
                        "label": label,
                        "stats": res,
                        "cpu": sampler.used,
                        "machine": sampler.machine_cores,
                    }
                )
    return _result(ttft, loads, duration, pairs, smoke)


def _result(
    ttft: dict[str, list[float]],
    loads: list[dict[str, Any]],
    duration: float,
    pairs: int,
    smoke: bool,
) -> report.Result:
    d50, d99 = percentile(ttft["direct"], 50), percentile(ttft["direct"], 99)
    c50, c99 = percentile(ttft["corral"], 50), percentile(ttft["corral"], 99)
    rows = []
    data_rows = []
    for item in loads:
        s: StreamStats = item["stats"]
        tps = s.tokens_in_window / duration
        rate_text = f"{item['rate']:g} tok/s per stream" if item["rate"] else "instant tokens"
        errors = ", ".join(f"{k}: {v}" for k, v in s.errors.items()) or "none"
        busiest = max(item["cpu"].items(), key=lambda kv: kv[1], default=("", 0.0))
        rows.append(
            [
                rate_text,
                "direct to fake" if item["label"] == "direct" else "through Corral",
                f"{tps:,.0f}",
                f"{tps / STREAMS:,.1f}",
                fmt_ms(percentile(s.ttft, 50), 1),
                fmt_ms(percentile(s.ttft, 99), 1),
                fmt_ms(percentile(s.gaps_max, 99), 1),
                f"{busiest[0]} {busiest[1] / duration:.2f}" if busiest[0] else "",
                f"{item['machine']:.2f}",
                errors,
            ]
        )
        data_rows.append(
            {
                "rate": item["rate"],
                "label": item["label"],
                "tokens_per_s": tps,
                "ttft_p50": percentile(s.ttft, 50),
                "ttft_p99": percentile(s.ttft, 99),
                "errors": s.errors,
                "cpu": item["cpu"],
                "machine_cores": item["machine"],
            }
        )
    md = [
        "## 6. Streaming",
        "",
        f"Time to first token, one streamed generate at a time ({pairs} each way, "
        f"alternating; fake at {RATE:g} tokens/s, {TTFT_TOKENS} tokens per answer):",
        "",
        report.table(
            ["path", "TTFT p50 ms", "TTFT p99 ms"],
            [
                ["direct to fake Ollama", fmt_ms(d50, 2), fmt_ms(d99, 2)],
                ["through Corral", fmt_ms(c50, 2), fmt_ms(c99, 2)],
                ["**added by Corral**", fmt_ms(c50 - d50, 2), fmt_ms(c99 - d99, 2)],
            ],
        ),
        "",
        f"The direct TTFT includes the fake's own pacing (the first token comes one token "
        f"interval, {1000 / RATE:.0f} ms, after the request).",
        "",
        f"{STREAMS} concurrent streams ({duration:g} s window; each client starts its next "
        "100-token generate when the last ends; one fake node with "
        f"{STREAMS} slots, its worker with {STREAMS} slots):",
        "",
        report.table(
            [
                "token rate",
                "path",
                "tokens/s received",
                "per stream",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "p99 of longest gap in a stream, ms",
                "busiest process (cores)",
                "machine busy, all processes (cores)",
                "errors",
            ],
            rows,
        ),
        "",
        "Through Corral every token is one Redis `PUBLISH` from the worker and one pub/sub "
        "message the gateway decodes and writes to its client, so the instant-token rows "
        "show the most tokens/s the path carries on this machine.",
        "",
        *_per_token(loads, duration),
    ]
    goals = report.Goals()
    goals.info("TTFT added p50 / p99", f"{fmt_ms(c50 - d50, 2)} / {fmt_ms(c99 - d99, 2)} ms")
    for row in data_rows:
        if row["label"] == "corral":
            what = f"{row['rate']:g} tok/s per stream" if row["rate"] else "instant tokens"
            goals.info(
                f"tokens/s through Corral, {STREAMS} streams, {what}",
                f"{row['tokens_per_s']:,.0f} (direct: "
                + next(
                    f"{r['tokens_per_s']:,.0f}"
                    for r in data_rows
                    if r["label"] == "direct" and r["rate"] == row["rate"]
                )
                + ")",
            )
    if smoke:
        md.insert(1, "\n_Smoke run: short windows, numbers are indicative only._")
    return {
        "name": "streaming",
        "markdown": "\n".join(md),
        "summary": goals.rows,
        "data": {
            "ttft_s": {"direct": [d50, d99], "corral": [c50, c99]},
            "added_ttft_p50_s": c50 - d50,
            "rows": data_rows,
        },
    }


def _per_token(loads: list[dict[str, Any]], duration: float) -> list[str]:
    cores = os.cpu_count() or 1
    out = ["CPU per token relayed through Corral:", ""]
    for item in loads:
        if item["label"] != "corral":
            continue
        s: StreamStats = item["stats"]
        tokens = max(1, s.tokens_in_window)
        cpu = item["cpu"]
        what = f"{item['rate']:g} tok/s per stream" if item["rate"] else "instant tokens"
        parts = ", ".join(
            f"{name} {cpu.get(name, 0.0) / tokens * 1e6:,.0f} µs"
            for name in ("worker-n1", "gateway", "redis", "fake-n1")
        )
        machine = item["machine"]
        out.append(
            f"- {what}: {parts}; the machine was {machine:.2f} of {cores} cores busy"
            + (" (saturated: the CPU was the limit)" if machine >= 0.9 * cores else "")
            + "."
        )
    out.append("")
    return out


def main() -> int:
    return report.main(__doc__ or "", lambda args: run(args.smoke))


if __name__ == "__main__":
    raise SystemExit(main())
