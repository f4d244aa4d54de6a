"""A small HTTP/1.1 client for the worker's one hop: to its own Ollama.

The hop is always the same shape (JSON in, JSON or NDJSON out, one server, keep-alive),
so a general client's features are pure cost: aiohttp spent about a fifth of the
worker's CPU per job and added 0.2 ms per call (bench/RESULTS.md). This one parses with
``httptools`` (the C parser uvicorn already brings), keeps idle connections for reuse and
closes a connection whose response was not read to its end, which is how Ollama learns
that a request was abandoned and frees its slot.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httptools


class HttpFailure(Exception):
    """The exchange failed below HTTP: connect refused, connection dropped, bad framing."""


class _Exchange(asyncio.Protocol):
    """One connection: at most one request in flight, its response buffered as it comes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.keep_alive = False
        self.headers_done = False
        self.complete = False
        self.failure: HttpFailure | None = None
        self.chunks: deque[bytes] = deque()
        self._wake: asyncio.Future[None] | None = None

    def send(self, data: bytes) -> None:
        self._reset()
        assert self.transport is not None
        self.transport.write(data)

    async def wait(self) -> None:
        """Until something new arrived: headers, a body chunk, the end, or a failure."""
        if self.chunks or self.complete or self.failure is not None:
            return
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.failure = HttpFailure(f"malformed HTTP response: {exc}")
            self.close()
        self._notify()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.failure is None:
            self.failure = HttpFailure("the server closed the connection mid-response")
        self._notify()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Response:
    """A response whose body is read as it arrives; see ``Http1Client.request``."""

    def __init__(self, exchange: _Exchange, read_timeout: float) -> None:
        self._exchange = exchange
        self._read_timeout = read_timeout

    @property
    def status(self) -> int:
        return self._exchange.status

    async def _headers(self) -> None:
        exchange = self._exchange
        while not exchange.headers_done:
            if exchange.failure is not None:
                raise exchange.failure
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body in the pieces it arrives in (chunked framing already removed)."""
        exchange = self._exchange
        while True:
            while exchange.chunks:
                yield exchange.chunks.popleft()
            if exchange.complete:
                return
            if exchange.failure is not None:
                raise exchange.failure
            await self._wait()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def _wait(self) -> None:
        async with asyncio.timeout(self._read_timeout):
            await self._exchange.wait()


class Http1Client:
    """Keep-alive HTTP/1.1 to one server (``http://`` or ``https://``)."""

    def __init__(
        self, base_url: str, *, connect_timeout: float, read_timeout: float, max_idle: int = 64
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {base_url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        default_port = (parts.scheme == "https" and self.port == 443) or self.port == 80
        name = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        self.host_header = name if default_port else f"{name}:{self.port}"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        """Idle keep-alive connections kept for reuse; more are closed as they come back."""
        self._idle: list[_Exchange] = []

    @asynccontextmanager
    async def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> AsyncIterator[Response]:
        """Send a request; the response's headers have arrived when this yields.

        Leaving the block before the body was read to its end (an error, a cancel) closes
        the connection: the server sees the client go.
        """
        head = self._head(method, path, body)
        exchange, reused = await self._connection()
        response = Response(exchange, self.read_timeout)
        try:
            exchange.send(head)
            try:
                await response._headers()
            except HttpFailure:
                if not reused or exchange.status:
                    raise
                # A kept-alive connection the server had already closed: nothing was
                # processed, so send once more on a new connection.
                exchange.close()
                exchange = await self._connect()
                response = Response(exchange, self.read_timeout)
                exchange.send(head)
                await response._headers()
            yield response
        except BaseException:
            exchange.close()
            raise
        reusable = exchange.complete and exchange.keep_alive and not exchange.closed
        if reusable and len(self._idle) < self.max_idle:
            self._idle.append(exchange)
        else:
            exchange.close()

    def _head(self, method: str, path: str, body: bytes | None) -> bytes:
        lines = [
            f"{method} {self.prefix}{path} HTTP/1.1",
            f"Host: {self.host_header}",
            "User-Agent: corral-worker",
            "Accept: application/json, application/x-ndjson",
        ]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return "\r\n".join(lines).encode() + b"\r\n\r\n" + (body or b"")

    async def _connection(self) -> tuple[_Exchange, bool]:
        while self._idle:
            exchange = self._idle.pop()
            if not exchange.closed:
                return exchange, True
        return await self._connect(), False

    async def _connect(self) -> _Exchange:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, exchange = await loop.create_connection(
                    _Exchange, self.host, self.port, ssl=self.ssl
                )
        except OSError as exc:
            raise HttpFailure(f"cannot connect: {exc}") from exc
        return exchange

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for exchange in idle:
            exchange.close()
