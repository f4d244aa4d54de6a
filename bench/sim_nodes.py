"""Simulated nodes: heartbeat records for N node ids, written every few seconds.

Each record has the shape a real worker writes (``corral.fleet.publish_heartbeat``):
models with ``/api/tags`` entries, a loaded model, slots and host metrics. No worker
stands behind them; they exist to load the registry, the gateway's fleet view and
``/api/tags``. On SIGTERM the ids are removed from the registry.

    python bench/sim_nodes.py --redis-url URL --nodes 100 --interval 2
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

from redis.asyncio import Redis

from corral.fleet import publish_heartbeat, remove_node
from corral.tooling.fake_ollama_models import describe, now_rfc3339

CATALOGUE = [f"sim-model-{i}:{size}b" for i in range(10) for size in (7, 13)]
MODELS_PER_NODE = 4


def record(index: int, stamp: str) -> dict[str, Any]:
    names = [CATALOGUE[(index * 3 + k) % len(CATALOGUE)] for k in range(MODELS_PER_NODE)]
    tags = [describe(name, stamp).tag_entry() for name in names]
    loaded = describe(names[0], stamp).ps_entry(4096, None)
    return {
        "node_id": f"sim-{index:03d}",
        "hosts": [f"10.0.{index // 250}.{index % 250 + 1}"],
        "ollama_url": f"http://10.0.{index // 250}.{index % 250 + 1}:11434",
        "state": "running",
        "models": tags,
        "loaded": [loaded],
        "slots_total": 4,
        "slots_busy": index % 5,
        "running": [],
        "started_at": time.time(),
        "cpu_percent": 12.5,
        "mem": {"total": 64 * 2**30, "available": 40 * 2**30},
        "gpus": [{"index": 0, "name": "sim", "mem_total": 24 * 2**30, "mem_used": 9 * 2**30}],
    }


async def main_async(url: str, nodes: int, interval: float, ttl: float) -> None:
    redis = Redis.from_url(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stamp = now_rfc3339()
    records = [record(i, stamp) for i in range(nodes)]
    beats = 0
    try:
        while not stop.is_set():
            started = time.monotonic()
            await asyncio.gather(*(publish_heartbeat(redis, r, ttl) for r in records))
            beats += 1
            if beats == 1:
                print(f"heartbeating {nodes} simulated nodes every {interval:g}s", flush=True)
            remaining = interval - (time.monotonic() - started)
            try:
                async with asyncio.timeout(max(0.0, remaining)):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        for r in records:
            await remove_node(redis, r["node_id"])
        await redis.aclose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--ttl", type=float, default=6.0, help="record TTL (the fleet's node ttl)")
    args = p.parse_args()
    asyncio.run(main_async(args.redis_url, args.nodes, args.interval, args.ttl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
