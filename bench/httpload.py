"""A lean HTTP/1.1 load client for the benchmarks, and the statistics they share.

Each virtual client owns one keep-alive connection (so the connection limit equals the
concurrency) and parses responses with ``httptools``, the C parser uvicorn already
depends on: no extra package, and far less client CPU per request than httpx. On a
small machine the client shares the cores with the system under test, so a cheap
client matters. Chunked bodies are decoded by the parser; ``on_body`` sees each piece
as it arrives, which is how streamed answers are timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

BodyCallback = Callable[[bytes], None]


class HttpError(Exception):
    """A request that got no complete HTTP answer; ``kind`` names the failure class."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    started: float  # perf_counter when the request was written
    first_byte: float  # perf_counter when the first body byte arrived (0 if none)
    done: float  # perf_counter when the response was complete

    @property
    def latency(self) -> float:
        return self.done - self.started

    def json(self) -> Any:
        return orjson.loads(self.body)


class _Protocol(asyncio.Protocol):
    """One connection; at most one request in flight (no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.keep_alive = True
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []
        self.on_body_cb: BodyCallback | None = None
        self.first_byte = 0.0
        self.complete = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError("bad-response", str(exc)))
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(HttpError("connection-closed", "server closed the connection mid-request"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if not self.first_byte:
            self.first_byte = time.perf_counter()
        if self.on_body_cb is not None:
            self.on_body_cb(body)
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: HttpError) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def prepare(self, on_body: BodyCallback | None) -> asyncio.Future[None]:
        self.status = 0
        self.headers = {}
        self.chunks = []
        self.on_body_cb = on_body
        self.first_byte = 0.0
        self.complete = False
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter


class Connection:
    """A keep-alive connection to one server that reconnects when the server closes it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.hostport = f"{self.host}:{self.port}".encode()
        self._proto: _Protocol | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(_Protocol, self.host, self.port)
        except OSError as exc:
            raise HttpError("connect", type(exc).__name__) from exc
        self._proto = proto

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        on_body: BodyCallback | None = None,
        time_limit: float | None = None,
    ) -> Response:
        proto = self._proto
        if proto is None or proto.closed or not proto.keep_alive:
            self.close()
            await self.connect()
            proto = self._proto
        assert proto is not None and proto.transport is not None
        waiter = proto.prepare(on_body)
        head = [f"{method} {path} HTTP/1.1".encode(), b"host: " + self.hostport]
        head += [f"{k}: {v}".encode() for k, v in headers]
        if body is not None:
            head.append(b"content-type: application/json")
            head.append(b"content-length: %d" % len(body))
        started = time.perf_counter()
        proto.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + (body or b""))
        try:
            if time_limit is None:
                await waiter
            else:
                async with asyncio.timeout(time_limit):
                    await waiter
        except TimeoutError:
            self.close()
            raise HttpError("timeout", f"no complete answer within {time_limit:g}s") from None
        except BaseException:
            self.close()  # cancelled mid-request: the connection state is unknown
            raise
        done = time.perf_counter()
        return Response(
            proto.status, proto.headers, b"".join(proto.chunks), started, proto.first_byte, done
        )

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


async def fetch(
    url: str, method: str = "GET", body: Any = None, *, time_limit: float = 30.0
) -> Response:
    """One request on a fresh connection (for control calls, not for load)."""
    parts = urlsplit(url)
    conn = Connection(url)
    try:
        raw = orjson.dumps(body) if body is not None and not isinstance(body, bytes) else body
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return await conn.request(method, path, raw, time_limit=time_limit)
    finally:
        conn.close()


async def get_json(url: str, *, time_limit: float = 30.0) -> Any:
    resp = await fetch(url, time_limit=time_limit)
    if resp.status != 200:
        raise HttpError(f"http-{resp.status}", resp.body[:200].decode(errors="replace"))
    return resp.json()


async def post_json(url: str, body: Any, *, time_limit: float = 30.0) -> Any:
    resp = await fetch(url, "POST", body, time_limit=time_limit)
    if resp.status != 200:
        raise HttpError(f"http-{resp.status}", resp.body[:200].decode(errors="replace"))
    return resp.json()


# ----------------------------------------------------------------------- closed-loop load


@dataclass
class LoadResult:
    concurrency: int
    window_s: float
    completed: int = 0  # successful answers finished inside the window
    latencies: list[float] = field(default_factory=list)  # seconds, window only
    errors: Counter[str] = field(default_factory=Counter)  # all errors, by kind
    total_ok: int = 0  # successful answers, whole run
    client_cpu_s: float = 0.0  # this process's CPU time during the window
    connected: int = 0

    @property
    def rate(self) -> float:
        return self.completed / self.window_s if self.window_s else 0.0


def classify(resp: Response) -> str | None:
    """None for a good Ollama answer, else an error kind."""
    if resp.status != 200:
        return f"http-{resp.status}"
    return None


async def open_connections(
    url: str, count: int, *, per_second: float = 0.0, errors: Counter[str] | None = None
) -> list[Connection]:
    """``count`` connected clients; ``per_second`` > 0 spreads the connects out."""
    conns = [Connection(url) for _ in range(count)]
    batch = max(1, int(per_second / 20)) if per_second > 0 else count
    ok: list[Connection] = []
    for start in range(0, count, batch):
        group = conns[start : start + batch]
        results = await asyncio.gather(*(c.connect() for c in group), return_exceptions=True)
        for conn, res in zip(group, results, strict=True):
            if isinstance(res, HttpError):
                if errors is not None:
                    errors[res.kind] += 1
            elif isinstance(res, BaseException):
                raise res
            else:
                ok.append(conn)
        if per_second > 0:
            await asyncio.sleep(batch / per_second)
    return ok


async def closed_loop(
    url: str,
    path: str,
    make_body: Callable[[int], bytes],
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    time_limit: float = 60.0,
    drain: float = 30.0,
    connect_rate: float = 0.0,
    check: Callable[[Response], str | None] = classify,
    on_window: Callable[[str], None] | None = None,
) -> LoadResult:
    """``concurrency`` clients, each sending its next request as soon as the last returns.

    Counts what finishes in ``[warmup, warmup + duration]``; then stops sending and waits
    (up to ``drain`` s) for the requests still out, so nothing is cut off mid-flight.
    """
    result = LoadResult(concurrency, duration)
    conns = await open_connections(url, concurrency, per_second=connect_rate, errors=result.errors)
    result.connected = len(conns)
    t0 = time.perf_counter()
    w0, w1 = t0 + warmup, t0 + warmup + duration
    stop = False
    seq = 0
    cpu: dict[str, float] = {}

    async def client(conn: Connection) -> None:
        nonlocal seq
        while not stop:
            seq += 1
            try:
                resp = await conn.request("POST", path, make_body(seq), time_limit=time_limit)
            except HttpError as exc:
                result.errors[exc.kind] += 1
                await asyncio.sleep(0.01)  # a refused connect must not spin
                continue
            kind = check(resp)
            if kind is not None:
                result.errors[kind] += 1
                continue
            result.total_ok += 1
            if w0 <= resp.done <= w1:
                result.completed += 1
                result.latencies.append(resp.latency)

    async def clock() -> None:
        nonlocal stop
        await asyncio.sleep(max(0.0, w0 - time.perf_counter()))
        cpu["start"] = _cpu_seconds()
        if on_window is not None:
            on_window("start")
        await asyncio.sleep(max(0.0, w1 - time.perf_counter()))
        cpu["end"] = _cpu_seconds()
        if on_window is not None:
            on_window("end")
        stop = True

    tasks = [asyncio.create_task(client(c)) for c in conns]
    await clock()
    _, late = await asyncio.wait(tasks, timeout=drain)
    for task in late:
        task.cancel()
    if late:
        result.errors["not-finished-after-drain"] += len(late)
        await asyncio.wait(late)
    for conn in conns:
        conn.close()
    result.client_cpu_s = cpu["end"] - cpu["start"]
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> float:
    return seconds * 1000.0


def fmt_ms(seconds: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.{digits}f}"


def fmt_s(seconds: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds:.{digits}f}"


def run_uvloop(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine function on uvloop (installed with uvicorn[standard])."""
    import uvloop

    return uvloop.run(main())  # type: ignore[arg-type]


async def gather_limited(coros: Sequence[Awaitable[Any]], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Any]) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


@contextlib.contextmanager
def cpu_meter() -> Any:
    """``with cpu_meter() as m: ...`` then ``m['s']`` is this process's CPU seconds."""
    box: dict[str, float] = {}
    start = _cpu_seconds()
    try:
        yield box
    finally:
        box["s"] = _cpu_seconds() - start
