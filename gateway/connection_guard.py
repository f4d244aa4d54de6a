"""What one connection may cost the gateway before it has sent a whole request head.

uvicorn bounds neither how long a client may take to send its request line and headers
nor how large they may grow, and accepts every connection it is offered: thousands of
connections that never finish a request stay open for good, and an endless header line
is buffered until memory runs out. ``GuardedHttpTools`` is uvicorn's httptools protocol
with those bounds added. It measures each request head itself, before the parser sees
the bytes, so a refusal never happens in the middle of a parse:

- the head (request line and headers) must be complete within ``header_timeout``
  seconds of its first byte (or of the connection opening): 408, then the connection
  is closed;
- the head may hold at most ``max_header_bytes`` bytes and ``max_headers`` header
  lines: 431;
- a connection beyond ``max_connections`` open ones is answered 503 and closed at once.

Refusals are written as Ollama-shaped JSON (``{"error": ...}``) with ``Connection:
close``. The body has its own read timeout in ``corral.gateway.inputs``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Busy"}
_HEAD_END = b"\r\n\r\n"
_LINGER_S = 2.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_connections: int = 4096


class GuardedConfig(uvicorn.Config):
    """uvicorn's config carrying the limits to each connection's protocol (it pickles, so
    the multi-process gateway hands it to its worker processes unchanged)."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **options: Any) -> None:
        super().__init__(app, http=GuardedHttpTools, **options)
        self.limits = limits


class GuardedHttpTools(HttpToolsProtocol):
    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits: ConnectionLimits = getattr(config, "limits", ConnectionLimits())
        self._in_head = True
        self._head_bytes = 0
        self._head_lines = 0
        self._tail = b""  # the last bytes seen, to find a head end split across reads
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too many connections to this gateway; try again shortly")
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head and not self._measure(data):
            return
        super().data_received(data)

    # The parser says where a head begins and ends; ``_measure`` only counts bytes, up to
    # the first head end in a read, so the body that follows in the same read is not
    # counted as head.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = self._head_lines = 0
        self._tail = b""
        self._disarm()
        super().on_headers_complete()

    def _measure(self, data: bytes) -> bool:
        """Count this read's share of the head; False (and refused) past a limit."""
        joined = self._tail + data
        end = joined.find(_HEAD_END)
        used = len(data) if end < 0 else max(0, end + len(_HEAD_END) - len(self._tail))
        self._head_bytes += used
        self._head_lines += data.count(b"\n", 0, used)
        self._tail = joined[-(len(_HEAD_END) - 1) :]
        limits = self.limits
        if self._head_bytes > limits.max_header_bytes:
            self._refuse(431, f"request headers too large (limit {limits.max_header_bytes} bytes)")
            return False
        # The request line and the blank line that ends the head are lines too.
        if self._head_lines > limits.max_headers + 2:
            self._refuse(431, f"too many request headers (limit {limits.max_headers})")
            return False
        return True

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self._in_head:
            return
        timeout = self.limits.header_timeout
        self._refuse(408, f"request headers not received within {timeout:g}s")

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._disarm()
        if self.transport.is_closing():
            return
        body = orjson.dumps({"error": message})
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n"
        ) % (status, _REASONS[status], len(body))
        self.transport.write(head + body)
        if self.transport.can_write_eof():
            # A lingering close: end our side and drop what the client still sends for a
            # moment. Closing at once, with its bytes unread, makes the kernel answer a
            # reset that can destroy the refusal before the client reads it.
            self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()
