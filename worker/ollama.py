"""The worker's client for its own Ollama, with transport errors mapped to ``BackendError``.

Retriable: the node could not be reached, broke the connection, timed out, or answered
5xx (another node or a later attempt may succeed). Not retriable: 4xx, which would fail
the same way anywhere, answered with Ollama's own message and status.

The HTTP underneath is ``worker.http1``, chosen on measurements: httpx cost the worker
about 2 ms of CPU per job, aiohttp still a fifth of its CPU (bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from corral.errors import BackendError
from worker.http1 import Http1Client, HttpFailure, Response


class OllamaClient:
    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float, slots: int):
        self.base_url = base_url.rstrip("/")
        self.http = Http1Client(
            self.base_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_idle=slots + 8,  # one per slot, and a few for discovery and heartbeats
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def get_json(self, path: str) -> Any:
        async with self._call("GET", path) as resp:
            return orjson.loads(await resp.read())

    async def post(self, path: str, body: bytes) -> bytes:
        """A non-streaming call (embeddings, show); returns the raw JSON body."""
        async with self._call("POST", path, body) as resp:
            return await resp.read()

    async def stream_lines(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """Ollama's NDJSON lines, as they arrive. Closing the iterator aborts the request."""
        async with self._call("POST", path, body) as resp:
            pending = b""
            async for data in resp.chunks():
                pending += data
                while (end := pending.find(b"\n")) >= 0:
                    line, pending = pending[:end], pending[end + 1 :]
                    if line.strip():
                        yield line
            if pending.strip():
                yield pending

    @asynccontextmanager
    async def _call(
        self, method: str, path: str, body: bytes | None = None
    ) -> AsyncIterator[Response]:
        try:
            async with self.http.request(method, path, body) as resp:
                await _raise_for_status(resp)
                yield resp
        except TimeoutError as exc:
            raise BackendError(f"Ollama at {self.base_url} timed out", 504, retriable=True) from exc
        except HttpFailure as exc:
            raise BackendError(
                f"Ollama at {self.base_url} is unreachable or dropped the connection: {exc}",
                502,
                retriable=True,
            ) from exc


async def _raise_for_status(resp: Response) -> None:
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
