"""The worker's client for its own Ollama, with httpx errors mapped to ``BackendError``.

Retriable: the node could not be reached, broke the connection, timed out, or answered
5xx (another node or a later attempt may succeed). Not retriable: 4xx, which would fail
the same way anywhere, answered with Ollama's own message and status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson

from corral.errors import BackendError


class OllamaClient:
    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float, slots: int):
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=slots + 8, max_keepalive_connections=slots + 8),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def get_json(self, path: str) -> Any:
        async with self._mapped():
            resp = await self.http.get(path)
            await _raise_for_status(resp)
            return resp.json()

    async def post(self, path: str, body: bytes) -> bytes:
        """A non-streaming call (embeddings, show); returns the raw JSON body."""
        async with self._mapped():
            resp = await self.http.post(path, content=body, headers=_JSON)
            await _raise_for_status(resp)
            return resp.content

    async def stream_lines(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """Ollama's NDJSON lines, as they arrive. Closing the iterator aborts the request."""
        async with (
            self._mapped(),
            self.http.stream("POST", path, content=body, headers=_JSON) as resp,
        ):
            await _raise_for_status(resp)
            async for line in resp.aiter_lines():
                if line:
                    yield line.encode()

    @asynccontextmanager
    async def _mapped(self) -> AsyncIterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise BackendError(
                f"Ollama at {self.base_url} timed out ({type(exc).__name__})", 504, retriable=True
            ) from exc
        except httpx.TransportError as exc:
            raise BackendError(
                f"Ollama at {self.base_url} is unreachable or dropped the connection: {exc!r}",
                502,
                retriable=True,
            ) from exc


_JSON = {"content-type": "application/json"}


async def _raise_for_status(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    raw = await resp.aread()
    message = raw.decode(errors="replace").strip() or resp.reason_phrase
    try:
        parsed = orjson.loads(raw)
        if isinstance(parsed, dict) and "error" in parsed:
            message = str(parsed["error"])
    except orjson.JSONDecodeError:
        pass
    raise BackendError(message, resp.status_code, retriable=resp.status_code >= 500)
