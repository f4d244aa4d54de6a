"""The worker's aiohttp client for its own Ollama, transport errors mapped to ``BackendError``.

Retriable: the node could not be reached, broke the connection, timed out, answered
5xx, or answered something that is not HTTP (or not JSON where JSON is due): another
node or a later attempt may succeed. Not retriable: 4xx, which would fail the same way
anywhere, answered with Ollama's own message and status. Statuses: 502 unreachable,
dropped or garbled, 504 a timeout (connect, read or the call's total), otherwise
Ollama's own.

A request that may have reached Ollama is never sent twice by this client: a generation
must not run twice because a kept-alive connection was stale. Since 3.9, aiohttp's
``ClientSession._request`` sends a request once more, on a new connection, when a
kept-alive one turns out closed, but only for idempotent methods (RFC 9112 §9.3.1):
our GETs (``/api/tags``, ``/api/ps``, ``/api/version``) may be re-sent; a POST fails
instead, and its job goes through Corral's own retry, which counts the attempt. A
connection the pool already knows closed is never used, so a request that provably
never left is simply sent on a new one. tests/test_ollama_client.py holds aiohttp to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from corral.errors import BackendError

# Connections beyond one per slot: discovery (/api/tags, /api/ps, /api/version, /api/show)
# and the heartbeat's /api/ps, which must never queue behind generations.
_SPARE_CONNECTIONS = 4
_JSON = {"Content-Type": "application/json"}


class OllamaClient:
    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float, slots: int):
        self.base_url = base_url.rstrip("/")
        self.limit = slots + _SPARE_CONNECTIONS
        # A timeout per phase: a short connect, a long read (Ollama may stay silent while
        # it loads a model), no total, since a generation may stream for as long as it
        # keeps sending. ``timeout=`` on a call adds a total for that call only.
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Made on first use: aiohttp binds a session to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit),
                timeout=self.timeout,
                cookie_jar=aiohttp.DummyCookieJar(),  # Ollama sets none; skip the jar's work
                # No compression asked for: a compressing proxy in front of Ollama would
                # hold streamed chunks back to fill its buffer.
                skip_auto_headers=("Accept-Encoding",),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    # ASYNC109 would have callers wrap the call in asyncio.timeout; here ``timeout``
    # becomes aiohttp's own total for the request (pool wait, connect, answer and body),
    # so the heartbeat's bound on /api/ps is one argument and maps to a 504 like the rest.
    async def get_json(self, path: str, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """``timeout``: seconds for the whole call, if given (the heartbeat's ``/api/ps``)."""
        async with self._call("GET", path, total=timeout) as resp:
            raw = await resp.read()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BackendError(
                f"Ollama at {self.base_url} answered {path} with something not JSON",
                502,
                retriable=True,
            ) from exc

    async def post(
        self,
        path: str,
        body: bytes,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (as in get_json)
    ) -> bytes:
        """A non-streaming call (embeddings, show); returns the raw JSON body."""
        async with self._call("POST", path, body, total=timeout) as resp:
            return await resp.read()

    async def stream_lines(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """Ollama's NDJSON lines, as they arrive. Closing the iterator aborts the request."""
        async with self._call("POST", path, body) as resp:
            finished = False
            try:
                # Lines are split here, not with readline(): a final chunk carrying a
                # long ``context`` can exceed aiohttp's line limit.
                pending = b""
                async for data in resp.content.iter_any():
                    pending += data
                    while (end := pending.find(b"\n")) >= 0:
                        line, pending = pending[:end], pending[end + 1 :]
                        if line.strip():
                            yield line
                if pending.strip():
                    yield pending
                finished = True  # read to its end: the connection goes back to the pool
            finally:
                if not finished:
                    # Left early (a cancel, an error): close the connection rather than
                    # leave it to aiohttp's release, so Ollama sees the client go and
                    # stops the generation, freeing its slot.
                    resp.close()

    @asynccontextmanager
    async def _call(
        self, method: str, path: str, body: bytes | None = None, *, total: float | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        options: dict[str, Any] = {}
        if total is not None:
            options["timeout"] = aiohttp.ClientTimeout(
                total=total,
                sock_connect=self.timeout.sock_connect,
                sock_read=self.timeout.sock_read,
            )
        if body is not None:
            options["data"] = body
            options["headers"] = _JSON
        try:
            async with self.session.request(
                method, self.base_url + path, allow_redirects=False, **options
            ) as resp:
                await _raise_for_status(resp)
                yield resp
        except TimeoutError as exc:  # aiohttp's connect and read timeouts subclass it
            raise BackendError(f"Ollama at {self.base_url} timed out", 504, retriable=True) from exc
        except aiohttp.ClientError as exc:  # refused, reset, dropped, not HTTP
            raise BackendError(
                f"Ollama at {self.base_url} is unreachable or dropped the connection: {exc!r}",
                502,
                retriable=True,
            ) from exc


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    raw = await resp.read()
    message = raw.decode(errors="replace").strip() or f"HTTP {resp.status}"
    try:
        parsed = orjson.loads(raw)
        if isinstance(parsed, dict) and "error" in parsed:
            message = str(parsed["error"])
    except orjson.JSONDecodeError:
        pass
    raise BackendError(message, resp.status, retriable=resp.status >= 500)
