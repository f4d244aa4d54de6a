"""ASGI plumbing for one HTTP exchange: bodies, JSON and NDJSON answers, disconnects, aborts.

The model endpoints are raw ASGI apps rather than Starlette request handlers because they
need three things the request/response layer hides: to watch `http.disconnect` while work
runs, to send NDJSON lines only when the work decides, and to kill the TCP connection the
way a crashing Ollama node does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from starlette.types import Message, Receive, Scope, Send

JSON_TYPE = b"application/json; charset=utf-8"
NDJSON_TYPE = b"application/x-ndjson"


class ApiError(Exception):
    """An Ollama-style error answer: `{"error": message}` with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class NodeCrashedError(Exception):
    """We dropped the connection mid-answer on purpose (crash injection)."""


class GarbageSentError(Exception):
    """We spoiled the answer on purpose (garbage injection); nothing more is to be sent."""


class ClientGoneError(Exception):
    """The client disconnected before the request body arrived."""


class _Abortable(Protocol):
    def abort(self) -> None: ...


class Exchange:
    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.started = False  # response headers sent
        self.complete = False  # final body chunk sent
        self.aborted = False  # we killed the connection on purpose
        self.model: str | None = None  # normalised model name, once known
        # Called just before a successful answer's last bytes go out, so that whatever it
        # records is visible by the time the client has the whole answer.
        self.on_complete: Callable[[], None] | None = None

    async def read_body(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGoneError
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def wait_disconnect(self) -> None:
        """Return when the client goes away (or the response finished; callers check)."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return

    async def send_json(self, status: int, payload: Any) -> None:
        body = orjson.dumps(payload)
        await self._start(status, JSON_TYPE, content_length=len(body))
        await self._body(body, more=False)

    async def send_error(self, status: int, message: str) -> None:
        self.on_complete = None
        await self.send_json(status, {"error": message})

    async def send_empty(self, status: int = 200) -> None:
        await self._start(status, None, content_length=0)
        await self._body(b"", more=False)

    async def start_stream(self) -> None:
        if not self.started:
            await self._start(200, NDJSON_TYPE, content_length=None)

    async def send_line(self, payload: Any) -> None:
        await self.start_stream()
        await self._body(orjson.dumps(payload, option=orjson.OPT_APPEND_NEWLINE), more=True)

    async def send_last_line(self, payload: Any) -> None:
        await self.start_stream()
        await self._body(orjson.dumps(payload, option=orjson.OPT_APPEND_NEWLINE), more=False)

    # Spoiled answers: none of these counts as a completed answer.

    async def send_bytes(self, status: int, content_type: bytes, body: bytes) -> None:
        self.on_complete = None
        await self._start(status, content_type, content_length=len(body))
        await self._body(body, more=False)

    async def send_raw_line(self, data: bytes) -> None:
        await self.start_stream()
        await self._body(data, more=True)

    async def end_stream(self) -> None:
        """End the body here, whatever was (not) sent: a stream cut short but well-formed."""
        self.on_complete = None
        await self.start_stream()
        await self._body(b"", more=False)

    def abort(self) -> bool:
        """Drop the TCP connection without finishing the response, as a dying server does.

        ASGI has no message for this, so reach the transport through uvicorn's bound
        `receive` method. Returns False where the server offers no transport.
        """
        owner = getattr(self._receive, "__self__", None)
        transport: _Abortable | None = getattr(owner, "transport", None)
        if transport is None or not callable(getattr(transport, "abort", None)):
            return False
        self.aborted = True
        transport.abort()
        return True

    async def _start(
        self, status: int, content_type: bytes | None, content_length: int | None
    ) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if content_type is not None:
            headers.append((b"content-type", content_type))
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        message: Message = {"type": "http.response.start", "status": status, "headers": headers}
        self.started = True
        await self._send(message)

    async def _body(self, body: bytes, *, more: bool) -> None:
        if not more:
            self.complete = True
            hook, self.on_complete = self.on_complete, None
            if hook is not None:
                hook()
        await self._send({"type": "http.response.body", "body": body, "more_body": more})
        if more:
            # Give the loop a turn per chunk so unpaced streams cannot starve other requests.
            await asyncio.sleep(0)
