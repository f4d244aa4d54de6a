"""What the worker's hop to Ollama costs per call, by HTTP client, against one fake Ollama.

The end-to-end benchmarks mix every process's CPU on a shared machine; this isolates the
client side of one hop. One process sends sequential streamed generates (0 tokens, the
answer is the final line only) to a fake Ollama running in its own process, and reads
its own CPU time (``time.process_time``) and the wall time per call, for:

- ``aiohttp``: the worker's ``OllamaClient`` as shipped (aiohttp, as DESIGN.md asks);
- ``httpx``: an ``httpx.AsyncClient`` streaming the same request, the other library
  the restructuring issue allowed;
- ``hand-written``: the small HTTP/1.1 client the worker used before it went back to a
  library (``worker/http1.py``), loaded from a commit that still has it
  (``--old-client-from``, default 446be36); skipped when git cannot show it.

Rounds alternate the clients so a machine that changes speed mid-run affects each alike.

    python bench/hop_cost.py [--calls 2000] [--rounds 3] [--old-client-from 446be36]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import orjson
import uvloop
from fleetctl import FakeSpec, Fleet

from corral.worker.ollama import OllamaClient

MODEL = "bench:latest"
WARMUP = 200
Call = Callable[[int], Awaitable[None]]


def body(seq: int) -> bytes:
    return orjson.dumps(
        {"model": MODEL, "prompt": f"p{seq}", "stream": True, "options": {"num_predict": 0}}
    )


def old_client(commit: str) -> ModuleType | None:
    """``worker/http1.py`` as it was at ``commit``, imported under a private name."""
    repo = Path(__file__).resolve().parent.parent
    shown = subprocess.run(
        ["git", "-C", str(repo), "show", f"{commit}:worker/http1.py"],
        capture_output=True,
        check=False,
    )
    if shown.returncode != 0:
        return None
    path = Path(tempfile.mkdtemp()) / "old_http1.py"
    path.write_bytes(shown.stdout)
    spec = importlib.util.spec_from_file_location("old_http1", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def clients(url: str, old: ModuleType | None) -> dict[str, tuple[Call, Any]]:
    ours = OllamaClient(url, connect_timeout=2, read_timeout=10, slots=4)

    async def via_aiohttp(seq: int) -> None:
        async for _ in ours.stream_lines("/api/generate", body(seq)):
            pass

    hx = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, connect=2))
    headers = {"Content-Type": "application/json"}

    async def via_httpx(seq: int) -> None:
        async with hx.stream("POST", "/api/generate", content=body(seq), headers=headers) as r:
            async for _ in r.aiter_raw():
                pass

    found: dict[str, tuple[Call, Any]] = {
        "aiohttp": (via_aiohttp, ours.aclose),
        "httpx": (via_httpx, hx.aclose),
    }
    if old is not None:
        hand = old.Http1Client(url, connect_timeout=2, read_timeout=10)

        async def via_hand_written(seq: int) -> None:
            async with hand.request("POST", "/api/generate", body(seq)) as resp:
                async for _ in resp.chunks():
                    pass

        found["hand-written"] = (via_hand_written, hand.aclose)
    return found


async def measure(calls: int, rounds: int, url: str, old: ModuleType | None) -> dict[str, Any]:
    found = await clients(url, old)
    results: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in found}
    for call, _ in found.values():
        for seq in range(WARMUP):
            await call(seq)
    for _ in range(rounds):
        for name, (call, _) in found.items():
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for seq in range(calls):
                await call(seq)
            results[name]["wall"].append((time.perf_counter() - wall0) / calls * 1e6)
            results[name]["cpu"].append((time.process_time() - cpu0) / calls * 1e6)
    for _, close in found.values():
        await close()
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="calls per client per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--old-client-from", default="446be36", help="commit with worker/http1.py")
    args = p.parse_args()
    old = old_client(args.old_client_from)
    with Fleet("hop-cost") as fleet:
        _, url = fleet.start_fake("n1", FakeSpec(models=[MODEL], num_parallel=8))
        results = uvloop.run(measure(args.calls, args.rounds, url, old))
    print(f"{args.calls} sequential calls per client per round, {args.rounds} rounds; µs per call")
    print("| client | CPU, median of rounds | CPU, each round | wall, median |")
    print("|---|---|---|---|")
    for name, r in results.items():
        each = " / ".join(f"{v:.0f}" for v in r["cpu"])
        print(
            f"| {name} | {statistics.median(r['cpu']):.0f} | {each} "
            f"| {statistics.median(r['wall']):.0f} |"
        )
    if old is None:
        print(f"(hand-written client skipped: git cannot show it at {args.old_client_from})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
