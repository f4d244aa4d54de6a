"""The worker's client for its own Ollama, with transport errors mapped to ``BackendError``.

Retriable: the node could not be reached, broke the connection, timed out, or answered
5xx (another node or a later attempt may succeed). Not retriable: 4xx, which would fail
the same way anywhere, answered with Ollama's own message and status.

It uses aiohttp rather than httpx: on this hop httpx (with anyio and h11 beneath it)
cost the worker about 2 ms of CPU per job, the largest share of its time (bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from corral.errors import BackendError


class OllamaClient:
    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float, slots: int):
        self.base_url = base_url.rstrip("/")
        self.http = aiohttp.ClientSession(
            base_url=self.base_url + "/",
            timeout=aiohttp.ClientTimeout(
                total=None, connect=connect_timeout, sock_read=read_timeout
            ),
            connector=aiohttp.TCPConnector(limit=slots + 8, keepalive_timeout=60),
            json_serialize=lambda value: orjson.dumps(value).decode(),
        )

    async def aclose(self) -> None:
        await self.http.close()

    async def get_json(self, path: str) -> Any:
        async with self._mapped(), self.http.get(path.lstrip("/")) as resp:
            await _raise_for_status(resp)
            return orjson.loads(await resp.read())

    async def post(self, path: str, body: bytes) -> bytes:
        """A non-streaming call (embeddings, show); returns the raw JSON body."""
        async with (
            self._mapped(),
            self.http.post(path.lstrip("/"), data=body, headers=_JSON) as resp,
        ):
            await _raise_for_status(resp)
            return await resp.read()

    async def stream_lines(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """Ollama's NDJSON lines, as they arrive. Closing the iterator aborts the request."""
        async with (
            self._mapped(),
            self.http.post(path.lstrip("/"), data=body, headers=_JSON) as resp,
        ):
            await _raise_for_status(resp)
            # Lines are split here, not with readline(): a final chunk carrying a long
            # ``context`` can exceed aiohttp's line limit.
            pending = b""
            async for data in resp.content.iter_any():
                pending += data
                while (end := pending.find(b"\n")) >= 0:
                    line, pending = pending[:end], pending[end + 1 :]
                    if line.strip():
                        yield line
            if pending.strip():
                yield pending

    @asynccontextmanager
    async def _mapped(self) -> AsyncIterator[None]:
        try:
            yield
        except TimeoutError as exc:
            raise BackendError(f"Ollama at {self.base_url} timed out", 504, retriable=True) from exc
        except aiohttp.ClientError as exc:
            raise BackendError(
                f"Ollama at {self.base_url} is unreachable or dropped the connection: {exc!r}",
                502,
                retriable=True,
            ) from exc


_JSON = {"content-type": "application/json"}


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    raw = await resp.read()
    message = raw.decode(errors="replace").strip() or (resp.reason or "error")
    try:
        parsed = orjson.loads(raw)
        if isinstance(parsed, dict) and "error" in parsed:
            message = str(parsed["error"])
    except orjson.JSONDecodeError:
        pass
    raise BackendError(message, resp.status, retriable=resp.status >= 500)
