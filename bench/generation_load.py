"""Corral against generations that take time: what it adds where a node does real work.

The overhead and throughput benchmarks answer instantly, so they weigh every microsecond
of Corral's own CPU against nothing; a real generation takes seconds. Here the fake
Ollama streams ``--tokens`` tokens at ``--token-rate`` tokens per second per request
(``--tokens 20 --token-rate 200``: 0.1 s a request), and closed-loop clients send the
same non-streaming generate directly to the fake and through Corral, one after the other.
Reported: requests/s and latency percentiles each way, and what Corral adds.

``compare_builds.py`` runs this file inside other checkouts of Corral (their own
``bench/fleetctl.py`` and ``bench/httpload.py``, imported from the working directory's
``bench/``), so it uses only what every version of those offers.

    python bench/generation_load.py [--tokens 20] [--token-rate 200] [--clients 32] [--json F]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

# The fleet and load helpers of the checkout this runs in (see the docstring).
sys.path.insert(0, str(Path.cwd() / "bench"))
from fleetctl import FakeSpec, Fleet
from httpload import closed_loop, percentile, run_uvloop

MODEL = "bench:latest"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=20, help="tokens per answer")
    p.add_argument("--token-rate", type=float, default=200.0, help="tokens/s per request")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients (= slots)")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per way")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args()

    def body(seq: int) -> bytes:
        return orjson.dumps(
            {
                "model": MODEL,
                "prompt": f"generation {seq}",
                "stream": False,
                "options": {"num_predict": args.tokens},
            }
        )

    spec = FakeSpec(models=[MODEL], num_parallel=args.clients, token_rate=args.token_rate)
    result: dict[str, Any] = {"tokens": args.tokens, "token_rate": args.token_rate}
    with Fleet("generation") as fleet:
        fleet.start_redis()
        node = fleet.add_node("n1", spec)
        fleet.start_gateway(expect_nodes=1)
        fleet.start_scheduler()
        for way, url in (("direct", node.fake_url), ("corral", fleet.gateway_url)):
            load = run_uvloop(
                lambda url=url: closed_loop(
                    url,
                    "/api/generate",
                    body,
                    concurrency=args.clients,
                    duration=args.duration,
                    warmup=args.warmup,
                )
            )
            result[way] = {
                "rate": load.rate,
                "p50": percentile(load.latencies, 50),
                "p99": percentile(load.latencies, 99),
                "errors": dict(load.errors),
            }
    result["added_p50"] = result["corral"]["p50"] - result["direct"]["p50"]
    print(
        f"{args.tokens} tokens at {args.token_rate:g}/s, {args.clients} clients: "
        f"direct {result['direct']['rate']:,.1f} req/s p50 {result['direct']['p50'] * 1e3:.2f} ms; "
        f"through Corral {result['corral']['rate']:,.1f} req/s "
        f"p50 {result['corral']['p50'] * 1e3:.2f} ms (adds {result['added_p50'] * 1e3:.2f} ms)"
    )
    if args.json:
        args.json.write_bytes(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
