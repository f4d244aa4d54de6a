"""``corral bench --gateway URL``: load a running gateway and report what it sustained.

What an operator runs after deploying a node: N requests (``--requests``) at a fixed
number in flight (``--concurrency``), streamed through the Ollama API, with a progress
bar, then a table of throughput (requests/s, tokens/s) and latency percentiles (time to
first token, total), and the errors by kind. ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

DEFAULT_GATEWAY = "http://127.0.0.1:11434"


@dataclass(slots=True)
class Outcome:
    ok: bool
    ttft: float = 0.0
    total: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass(slots=True)
class Summary:
    wall: float
    outcomes: list[Outcome] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        done = [o for o in self.outcomes if o.ok]
        tokens = sum(o.tokens for o in done)
        return {
            "requests": len(self.outcomes),
            "ok": len(done),
            "errors": dict(Counter(o.error for o in self.outcomes if not o.ok)),
            "wall_s": round(self.wall, 3),
            "requests_per_s": round(len(done) / self.wall, 2) if self.wall else 0.0,
            "tokens_per_s": round(tokens / self.wall, 1) if self.wall else 0.0,
            "ttft_ms": _percentiles([o.ttft for o in done]),
            "total_ms": _percentiles([o.total for o in done]),
        }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    if len(values) == 1:
        return {k: round(values[0] * 1000, 2) for k in ("p50", "p90", "p99")}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {f"p{q}": round(cuts[q - 1] * 1000, 2) for q in (50, 90, 99)}


async def one(client: httpx.AsyncClient, body: bytes, headers: dict[str, str]) -> Outcome:
    start = time.perf_counter()
    first = 0.0
    final: dict[str, Any] = {}
    try:
        async with client.stream("POST", "/api/generate", content=body, headers=headers) as reply:
            if reply.status_code != 200:
                await reply.aread()
                return Outcome(False, error=f"http-{reply.status_code}")
            async for line in reply.aiter_lines():
                if not line:
                    continue
                if not first:
                    first = time.perf_counter()
                chunk = orjson.loads(line)
                if "error" in chunk:
                    return Outcome(False, error="stream-error")
                if chunk.get("done"):
                    final = chunk
    except httpx.HTTPError as exc:
        return Outcome(False, error=type(exc).__name__)
    end = time.perf_counter()
    if not final:
        return Outcome(False, error="incomplete")
    return Outcome(True, first - start, end - start, int(final.get("eval_count") or 0))


async def run(args: argparse.Namespace, progress: Progress | None = None) -> Summary:
    body = orjson.dumps(
        {
            "model": args.model,
            "prompt": args.prompt,
            "stream": True,
            "options": {"num_predict": args.num_predict},
        }
    )
    headers = {"content-type": "application/json"}
    if args.priority is not None:
        headers["x-corral-priority"] = str(args.priority)
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    task = progress.add_task("requests", total=args.requests) if progress else None
    outcomes: list[Outcome] = []
    todo = iter(range(args.requests))
    limits = httpx.Limits(max_connections=args.concurrency)
    timeout = httpx.Timeout(10.0, read=None)

    async def lane(client: httpx.AsyncClient) -> None:
        for _ in todo:  # the lanes share one iterator: each request is sent once
            outcomes.append(await one(client, body, headers))
            if progress is not None and task is not None:
                progress.advance(task)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=args.gateway, limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(lane(client) for _ in range(args.concurrency)))
    return Summary(time.perf_counter() - start, outcomes)


def table(summary: dict[str, Any], args: argparse.Namespace) -> Table:
    out = Table(title=f"corral bench: {args.gateway}, {args.model}, {args.concurrency} in flight")
    out.add_column("figure")
    out.add_column("value", justify="right")
    out.add_row("requests ok / sent", f"{summary['ok']} / {summary['requests']}")
    for error, count in summary["errors"].items():
        out.add_row(f"errors: {error}", str(count))
    out.add_row("wall time", f"{summary['wall_s']:.2f} s")
    out.add_row("throughput", f"{summary['requests_per_s']:.2f} req/s")
    out.add_row("tokens", f"{summary['tokens_per_s']:.1f} tok/s")
    for name in ("ttft_ms", "total_ms"):
        for q, value in summary[name].items():
            label = "time to first token" if name == "ttft_ms" else "total time"
            out.add_row(f"{label} {q}", "-" if value is None else f"{value:.1f} ms")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral bench --gateway URL", description=__doc__)
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help="the gateway to load")
    parser.add_argument("--model", default="llama3", help="model to ask (default llama3)")
    parser.add_argument("--prompt", default="Say hello.", help="the prompt of every request")
    parser.add_argument("--requests", type=_positive, default=100, help="requests in all")
    parser.add_argument("--concurrency", type=_positive, default=8, help="requests in flight")
    parser.add_argument("--num-predict", type=_positive, default=32, help="tokens per answer")
    parser.add_argument("--priority", type=int, choices=range(10), metavar="0-9")
    parser.add_argument("--api-key", help="bearer key, when the gateway requires one")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.json) as progress:
        summary = asyncio.run(run(args, progress)).to_json()
    if args.json:
        sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        Console().print(table(summary, args))
    return 0 if summary["ok"] == summary["requests"] else 1
