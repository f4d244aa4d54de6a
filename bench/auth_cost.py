"""What API keys and rate limits cost a request, end to end.

One fleet (Redis, one fake Ollama node and its worker, one gateway, each its own process
as in ``bench_overhead.py``) answers the same 0-token generate one request at a time:
first with no key configured (Corral open), then, once keys are stored, with a key of no
class (a lookup in the gateway's in-process cache), alternating with a key whose class
has request and token limits (one more Redis call per request: the rate-limit script).

It also times, in process, the check an open gateway runs for each request (no key
configured: ``Authenticator.principal`` answering from its cached "no keys" flag) against
an empty coroutine, best of 5 runs of 200,000 calls.

    python bench/auth_cost.py [--count 300]
"""

from __future__ import annotations

import argparse
import time

import orjson
import report
from fleetctl import FakeSpec, Fleet, raise_nofile
from httpload import Connection, HttpError, fmt_ms, percentile, run_uvloop

from corral import keys
from corral.tenants import ApiKey, KeyClass, Scope, digest

MODEL = "bench:latest"
BODY = orjson.dumps(
    {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 0}}
)


async def _timed(conn: Connection, headers: list[tuple[str, str]]) -> float:
    resp = await conn.request("POST", "/api/generate", BODY, headers=headers, time_limit=30)
    if resp.status != 200:
        raise HttpError(f"http-{resp.status}", resp.body[:200].decode(errors="replace"))
    return resp.latency


Headers = list[tuple[str, str]]


async def measure(url: str, modes: dict[str, Headers], count: int) -> dict[str, list[float]]:
    conn = Connection(url)
    for headers in modes.values():
        for _ in range(count // 5):  # warm-up
            await _timed(conn, headers)
    found: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(count):
        for name, headers in modes.items():
            found[name].append(await _timed(conn, headers))
    conn.close()
    return found


class _NoKeys:
    async def exists(self, *names: str) -> int:
        return 0


def in_process(calls: int = 200_000) -> dict[str, float]:
    """Nanoseconds per call: the open gateway's check, and an empty coroutine."""
    from starlette.requests import Request

    from corral.gateway.auth import Authenticator
    from corral.settings import GatewaySettings

    auth = Authenticator(GatewaySettings(), _NoKeys())  # type: ignore[arg-type]
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})

    async def empty(request: Request, need: Scope) -> None:
        return None

    async def loop(fn: object) -> float:
        started = time.perf_counter_ns()
        for _ in range(calls):
            await fn(request, Scope.USER)  # type: ignore[operator]
        return (time.perf_counter_ns() - started) / calls

    import asyncio

    return {
        "empty coroutine": min(asyncio.run(loop(empty)) for _ in range(5)),
        "open gateway's check": min(asyncio.run(loop(auth.principal)) for _ in range(5)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=300)
    count = parser.parse_args().count
    raise_nofile()
    with Fleet("auth") as fleet:
        fleet.start_redis()
        fleet.add_node("n1", FakeSpec(models=[MODEL], num_parallel=4))
        fleet.start_gateway(["--auth-cache-ttl", "1"], expect_nodes=1)
        results = run_uvloop(lambda: measure(fleet.gateway_url, {"open": []}, count))
        redis = fleet.redis_client()
        limited = KeyClass("limited", key_rpm=10**9, key_tpm=10**9)
        redis.hset(keys.KEY_CLASSES, limited.name, limited.to_json())
        for name, klass in (("plain", ""), ("limited", "limited")):
            key = ApiKey(id=name, key_class=klass, scopes=frozenset({Scope.USER}))
            redis.hset(keys.API_KEYS, digest(f"token-{name}"), key.to_json())
        time.sleep(1.5)  # the gateway re-reads whether keys exist every auth_cache_ttl
        results |= run_uvloop(
            lambda: measure(
                fleet.gateway_url,
                {
                    "key (cached)": [("authorization", "Bearer token-plain")],
                    "key + rate limits": [("authorization", "Bearer token-limited")],
                },
                count,
            )
        )
    rows = [
        [name, fmt_ms(percentile(lat, 50), 3), fmt_ms(percentile(lat, 90), 3),
         fmt_ms(percentile(lat, 99), 3), len(lat)]
        for name, lat in results.items()
    ]  # fmt: skip
    machine = report.machine()
    print(
        f"Measured {report.now_utc()} on {machine.get('cpu', '?')} "
        f"({machine.get('cores', '?')} cores), {count} sequential requests per mode:\n"
    )
    print(report.table(["mode", "p50 ms", "p90 ms", "p99 ms", "n"], rows))
    timed = in_process()
    print("\nIn process, per call:\n")
    print(report.table(["call", "ns"], [[k, f"{v:.0f}"] for k, v in timed.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
