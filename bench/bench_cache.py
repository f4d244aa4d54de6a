"""Benchmark 7, the shared response cache: hit latency, and a repeated-prompt workload.

Part 1, latency, one request at a time on keep-alive connections, fake Ollama answering
at once (0 tokens), so a miss is the gateway's whole answer-free path: deterministic
misses (a new prompt each time), L1 hits, L2 hits (a gateway with L1 off), and
requests that are not cacheable (``bypass``) next to the same requests on a gateway
with the cache off, which shows what the cache costs a request it cannot serve.

Part 2, a workload where half the prompts repeat: the same requests, at the same
concurrency, on a fleet whose fake Ollama generates at a fixed token rate, with the
cache on and then off. GPU-seconds saved are the simulated generation times
(``prompt_eval_duration`` + ``eval_duration`` of the final object) of the answers the
cache served; the fake's own request counts show the calls that were not made.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import orjson
import report
from fleetctl import START_DEADLINE, FakeSpec, Fleet, Proc, _http_ok, corral_argv, raise_nofile
from httpload import Connection, HttpError, fmt_ms, percentile, run_uvloop

from corral.tooling.redis_proc import free_port

MODEL = "bench:latest"
HIT_GOAL_MS = 1.0


def _body(prompt: str, *, cacheable: bool, num_predict: int = 0) -> bytes:
    options: dict[str, Any] = {"num_predict": num_predict}
    if cacheable:
        options["temperature"] = 0
    return orjson.dumps({"model": MODEL, "prompt": prompt, "stream": False, "options": options})


def _gateway(fleet: Fleet, name: str, args: list[str]) -> str:
    port = free_port()
    argv = corral_argv(
        "gateway", "--redis-url", fleet.redis_url, "--port", str(port),
        "--log-level", "WARNING", *args,
    )  # fmt: skip
    proc: Proc = fleet.spawn(name, argv)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        raw = _http_ok(url + "/healthz")
        return raw is not None and int(orjson.loads(raw).get("nodes", 0)) >= 1

    proc.wait_until(ready, START_DEADLINE, name)
    return url


async def _timed(conn: Connection, body: bytes, expect: str | None) -> float:
    resp = await conn.request("POST", "/api/generate", body, time_limit=30)
    if resp.status != 200:
        raise HttpError(f"http-{resp.status}", resp.body[:200].decode(errors="replace"))
    outcome = resp.headers.get(b"x-corral-cache", b"").decode()
    if expect is not None and outcome != expect:
        raise HttpError("cache", f"expected {expect}, got {outcome!r}")
    return resp.latency


async def latency(urls: dict[str, str], count: int) -> dict[str, list[float]]:
    on, l2, off = (Connection(urls[k]) for k in ("on", "l2", "off"))
    out: dict[str, list[float]] = {k: [] for k in ("miss", "l1", "l2", "bypass", "off")}
    hot = _body("the same question", cacheable=True)
    await _timed(on, hot, None)  # stored: every later one is a hit
    await _timed(l2, hot, None)
    plain = _body("not cacheable", cacheable=False)
    for i in range(count + 50):
        rows = [
            ("miss", on, _body(f"new question {i}", cacheable=True), "miss"),
            ("l1", on, hot, "hit"),
            ("l2", l2, hot, "hit"),
            ("bypass", on, plain, "bypass"),
            ("off", off, plain, None),
        ]
        random.shuffle(rows)  # neither always follows the other
        for name, conn, body, expect in rows:
            lat = await _timed(conn, body, expect)
            if i >= 50:  # warm-up
                out[name].append(lat)
    for conn in (on, l2, off):
        conn.close()
    return out


async def workload(url: str, total: int, concurrency: int, pool: int) -> dict[str, Any]:
    """``total`` requests, half of them one of ``pool`` repeated prompts, in random order."""
    rng = random.Random(7)
    prompts = [
        f"repeat {rng.randrange(pool)} of the pool" if i % 2 else f"unique question {i}"
        for i in range(total)
    ]
    rng.shuffle(prompts)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    served: list[tuple[str, float, float]] = []  # outcome, latency, simulated GPU seconds

    async def client() -> None:
        conn = Connection(url)
        while not queue.empty():
            body = _body(queue.get_nowait(), cacheable=True, num_predict=32)
            resp = await conn.request("POST", "/api/generate", body, time_limit=120)
            if resp.status != 200:
                raise HttpError(f"http-{resp.status}", resp.body[:200].decode(errors="replace"))
            final = resp.json()
            gpu = (final.get("prompt_eval_duration", 0) + final.get("eval_duration", 0)) / 1e9
            outcome = resp.headers.get(b"x-corral-cache", b"off").decode()
            served.append((outcome, resp.latency, gpu))
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"served": served, "wall": time.perf_counter() - started}


def _fake_calls(fleet: Fleet) -> int:
    url = fleet.nodes[0].fake_url
    raw = _http_ok(url + "/_fake/stats")
    if raw is None:
        return -1
    return int(orjson.loads(raw).get("requests", {}).get("/api/generate", 0))


def run(smoke: bool) -> report.Result:
    count = 100 if smoke else 2000
    total, concurrency, pool, rate = (60, 8, 6, 100.0) if smoke else (400, 16, 40, 100.0)
    raise_nofile()
    with Fleet("cache") as fleet:
        fleet.start_redis()
        fleet.add_node("n1", FakeSpec(models=[MODEL], num_parallel=8))
        urls = {
            "on": fleet.start_gateway(expect_nodes=1),
            "l2": _gateway(fleet, "gateway-l2", ["--cache-l1-bytes", "0"]),
            "off": _gateway(fleet, "gateway-off", ["--no-cache"]),
        }
        lat = run_uvloop(lambda: latency(urls, count))
    runs: dict[str, Any] = {}
    for mode in ("on", "off"):
        with Fleet(f"cache-{mode}") as fleet:
            fleet.start_redis()
            fleet.add_node("n1", FakeSpec(models=[MODEL], num_parallel=4, token_rate=rate))
            url = fleet.start_gateway([] if mode == "on" else ["--no-cache"], expect_nodes=1)
            runs[mode] = run_uvloop(lambda url=url: workload(url, total, concurrency, pool))
            runs[mode]["calls"] = _fake_calls(fleet)
    return _result(lat, runs, count, total, concurrency, pool, rate, smoke)


def _result(
    lat: dict[str, list[float]],
    runs: dict[str, Any],
    count: int,
    total: int,
    concurrency: int,
    pool: int,
    rate: float,
    smoke: bool,
) -> report.Result:
    p = {name: {q: percentile(v, q) for q in (50, 90, 99)} for name, v in lat.items()}
    labels = {
        "miss": "miss (new deterministic prompt, instant answer)",
        "l1": "hit from L1 (gateway memory)",
        "l2": "hit from L2 (Redis; gateway with L1 off)",
        "bypass": "not cacheable, cache on (bypass)",
        "off": "not cacheable, cache off",
    }
    rows = [[labels[n], *(fmt_ms(p[n][q], 3) for q in (50, 90, 99)), len(lat[n])] for n in lat]
    hit_added = max(p["l1"][50], p["l2"][50]) - p["miss"][50]
    bypass_added = p["bypass"][50] - p["off"][50]
    on, off = runs["on"], runs["off"]
    hits = [s for s in on["served"] if s[0] == "hit"]
    saved = sum(gpu for _, _, gpu in hits)
    spent = sum(gpu for o, _, gpu in on["served"] if o != "hit")
    all_off = sum(gpu for _, _, gpu in off["served"])
    miss_lat = [lat_ for o, lat_, _ in on["served"] if o != "hit"]
    headers = ["cache", "Ollama calls", "wall s", "simulated GPU s spent", "GPU s saved"]
    headers += ["hits", "hit p50 ms", "miss p50 ms"]
    off_lat = [s[1] for s in off["served"]]
    table = [
        [on["calls"], on["wall"], spent, saved, len(hits)],
        [off["calls"], off["wall"], all_off, 0.0, 0],
    ]
    table[0] = ["on", *table[0], fmt_ms(percentile([h[1] for h in hits], 50), 3)]
    table[0].append(fmt_ms(percentile(miss_lat, 50), 1))
    table[1] = ["off", *table[1], "n/a", fmt_ms(percentile(off_lat, 50), 1)]
    goals = report.Goals()
    md = [
        "## 8. Response cache (hit latency; a workload where half the prompts repeat)",
        "",
        f"Latency: {count} requests of each kind, one at a time, interleaved in random order "
        "on keep-alive connections, after 50 of each as warm-up. Fleet: 1 fake node "
        "(8 slots, answering at once), 1 worker, 3 gateways (cache on; cache on with L1 "
        "off; cache off), Redis. `POST /api/generate`, `stream: false`, "
        "`options.num_predict: 0`; deterministic means `temperature: 0`.",
        "",
        report.table(["request", "p50 ms", "p90 ms", "p99 ms", "n"], rows),
        "",
        goals.check(
            "cache hit p50 added over a miss's answer-free path",
            hit_added * 1e3,
            HIT_GOAL_MS,
            "ms",
            lower_is_better=True,
        ),
        f"- a request the cache cannot serve: {bypass_added * 1e3:+.3f} ms p50 against the "
        "same request on a gateway with the cache off",
        "",
        f"Workload: {total} deterministic generations (`num_predict: 32`, fake Ollama at "
        f"{rate:g} tokens/s, 4 slots), {concurrency} clients; every other prompt is one of "
        f"{pool} repeated ones, in random order.",
        "",
        report.table(headers, table),
        "",
        "Hits here include requests that followed a job already running for the same "
        "prompt (single-flight), whose latency is that job's remaining time.",
    ]
    if smoke:
        md.insert(1, "\n_Smoke run: too short for stable percentiles._")
    return {
        "name": "cache",
        "markdown": "\n".join(md),
        "summary": goals.rows,
        "data": {
            "percentiles_s": p,
            "hit_added_p50_s": hit_added,
            "bypass_added_p50_s": bypass_added,
            "gpu_s_saved": saved,
            "gpu_s_spent": spent,
            "gpu_s_without_cache": all_off,
            "ollama_calls": {"on": on["calls"], "off": off["calls"]},
            "wall_s": {"on": on["wall"], "off": off["wall"]},
        },
    }


def main() -> int:
    return report.main(__doc__ or "", lambda args: run(args.smoke))


if __name__ == "__main__":
    raise SystemExit(main())
