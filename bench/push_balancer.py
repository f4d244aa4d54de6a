"""A minimal push load balancer for Ollama nodes: the reference baseline for Corral.

This is the kind of proxy people put in front of several Ollama servers today: every
request is forwarded at once to one node, chosen by

* ``round-robin``: the next node in turn, or
* ``least-connections``: the node with the fewest requests in flight through us
  (ties in turn),

and the node's answer is streamed straight back (NDJSON chunks pass through as they
arrive). Like nginx's passive health checks (``proxy_next_upstream error`` with
``non_idempotent``), a node that refuses the connection, or drops it before any
response header, is skipped for ``--fail-timeout`` seconds and the request goes to the
next node (the client has seen nothing yet); a node that dies mid-answer cuts the
client's answer. It knows nothing about models, loads or node speed.

    python bench/push_balancer.py --port 8080 --mode least-connections \\
        --node http://127.0.0.1:11434 --node http://10.0.0.2:11434

Needs aiohttp (``pip install aiohttp``). ``GET /_balancer/stats`` shows its counters.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import time
from typing import Any

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def _aiohttp() -> Any:
    try:
        import aiohttp
        from aiohttp import web
    except ImportError:
        sys.exit(
            "push_balancer.py needs aiohttp: pip install aiohttp "
            "(it is the reference proxy for the benchmarks, not part of Corral)"
        )
    return aiohttp, web


class Backend:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.active = 0
        self.sent = 0
        self.failures = 0
        self.down_until = 0.0

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until


class Balancer:
    def __init__(self, nodes: list[str], mode: str, fail_timeout: float) -> None:
        self.backends = [Backend(u) for u in nodes]
        self.mode = mode
        self.fail_timeout = fail_timeout
        self._turn = itertools.count()
        self.errors: dict[str, int] = {}

    def order(self) -> list[Backend]:
        """Backends to try, best first: the chosen one, then the rest in turn."""
        n = len(self.backends)
        start = next(self._turn) % n
        rotated = self.backends[start:] + self.backends[:start]
        live = [b for b in rotated if b.up] or rotated
        if self.mode == "least-connections":
            live.sort(key=lambda b: b.active)  # stable: ties keep the round-robin order
        return live

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def build_app(balancer: Balancer) -> Any:
    aiohttp, web = _aiohttp()
    session_box: dict[str, Any] = {}

    async def on_startup(app: Any) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        # No total timeout: a generation may stream for minutes; connect fails fast.
        timeout = aiohttp.ClientTimeout(total=None, connect=3.0, sock_read=None)
        session_box["s"] = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )

    async def on_cleanup(app: Any) -> None:
        await session_box["s"].close()

    async def stats(request: Any) -> Any:
        return web.json_response(
            {
                "mode": balancer.mode,
                "errors": balancer.errors,
                "backends": [
                    {"url": b.url, "active": b.active, "sent": b.sent, "failures": b.failures}
                    for b in balancer.backends
                ],
            }
        )

    async def forward(request: Any) -> Any:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        session = session_box["s"]
        for backend in balancer.order():
            backend.active += 1
            try:
                try:
                    upstream = await session.request(
                        request.method,
                        backend.url + request.rel_url.path_qs,
                        data=body,
                        headers=headers,
                        allow_redirects=False,
                    )
                except aiohttp.ClientConnectorError:
                    # Refused: mark the node down and try the next one.
                    backend.failures += 1
                    backend.down_until = time.monotonic() + balancer.fail_timeout
                    balancer.count_error("refused, retried on the next node")
                    continue
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    # Dropped before any response header: the client has seen nothing.
                    backend.failures += 1
                    backend.down_until = time.monotonic() + balancer.fail_timeout
                    balancer.count_error("dropped before answering, retried on the next node")
                    continue
                backend.sent += 1
                return await _relay(request, upstream, balancer, web, aiohttp)
            finally:
                backend.active -= 1
        balancer.count_error("no-backend")
        return web.json_response({"error": "no backend available"}, status=502)

    app = web.Application(client_max_size=64 * 2**20)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/_balancer/stats", stats)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def _relay(request: Any, upstream: Any, balancer: Balancer, web: Any, aiohttp: Any) -> Any:
    async with upstream:
        out = web.StreamResponse(status=upstream.status)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                out.headers[key] = value
        await out.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            # The node died mid-answer: cut the client's answer too (as a proxy would).
            balancer.count_error("upstream-died-mid-answer")
            if request.transport is not None:
                request.transport.close()
            return out
        await out.write_eof()
        return out


async def serve(args: argparse.Namespace) -> None:
    _, web = _aiohttp()
    balancer = Balancer(args.node, args.mode, args.fail_timeout)
    runner = web.AppRunner(build_app(balancer), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=4096)
    await site.start()
    print(f"push balancer ({args.mode}) on http://{args.host}:{args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--mode", choices=["round-robin", "least-connections"], default="round-robin")
    p.add_argument("--node", action="append", required=True, help="an Ollama base URL")
    p.add_argument("--fail-timeout", type=float, default=10.0)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
