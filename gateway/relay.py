"""The job path at the edge: enqueue a job, then answer its client from the replies.

``JobResponse`` is an ASGI response that owns one job from enqueue to answer. It waits
for the first reply before it sends a status line, so an error the node reports before
any output (unknown model, bad options) keeps its HTTP status, as with Ollama. It watches
the client the whole time: a client that leaves cancels its job, queued or running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from corral import protocol
from corral.errors import QueueFull
from corral.gateway.dialect import Dialect
from corral.gateway.replies import DISCONNECTED, Inbox, ReplyRouter
from corral.jobs import JobSpec, JobStore
from corral.protocol import Reply
from corral.telemetry import Recorder

log = logging.getLogger(__name__)

JSON_TYPE = b"application/json; charset=utf-8"
DEGRADED_HEADER = b"x-corral-degraded"
"""How a degraded request was changed (``level=2; model=llama3:8b; num_predict=256``)."""


def _due(reply: Reply, expected: int) -> bool:
    """Whether a final reply may be written once ``expected`` chunks are out: the node's
    own final comes after its chunks (a failure before any output is final at 0), and
    one whose sender could not know the count (``UNSEQUENCED``) ends the answer at once."""
    return reply.seq <= expected or reply.seq == protocol.UNSEQUENCED


class JobTimeout(Exception):
    """No reply arrived within the request's time limit."""


class JobResponse(Response):
    """Runs one job for one HTTP request. Create it with ``await JobResponse.submit(...)``."""

    def __init__(
        self,
        spec: JobSpec,
        store: JobStore,
        router: ReplyRouter,
        dialect: Dialect,
        queue: Inbox,
        timeout: float,
        recorder: Recorder | None = None,
        started: float = 0.0,
    ) -> None:
        # Not Response.__init__: this response has no body up front, only a job to relay.
        self.spec = spec
        self.store = store
        self.router = router
        self.dialect = dialect
        self.queue = queue
        self.timeout = timeout
        self.extra_headers: list[tuple[bytes, bytes]] = [(b"x-corral-job-id", spec.job_id.encode())]
        if spec.degraded:
            self.extra_headers.append((DEGRADED_HEADER, spec.degraded.encode()))
        self._settled = False
        self.recorder = recorder
        self.started = started
        """``time.perf_counter()`` before the enqueue: where its latencies start."""
        self.first_at = 0.0
        self.outcome = "disconnected"
        """The ``outcome`` label: done, error, timeout or disconnected."""
        self.on_done: Callable[[bytes], Awaitable[None]] | None = None
        """Called with the job's final object once the client has it (settles a token
        charge: ``corral.gateway.admission``)."""

    @classmethod
    async def submit(
        cls,
        spec: JobSpec,
        store: JobStore,
        router: ReplyRouter,
        dialect: Dialect,
        *,
        max_queue: int,
        wait_limit: float,
        recorder: Recorder | None = None,
    ) -> JobResponse:
        """Enqueue the job, listening for its replies first so none can be missed."""
        started = time.perf_counter()
        queue = router.register(spec.job_id)
        try:
            await store.enqueue(spec, max_queue=max_queue)
        except BaseException as exc:
            router.unregister(spec.job_id)
            if recorder is not None and isinstance(exc, QueueFull):
                recorder.count("req", request_labels(spec, dialect, "rejected"))
            raise
        return cls(spec, store, router, dialect, queue, wait_limit, recorder, started)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch_client(receive))
        try:
            await self._answer(send)
        except OSError:  # the client's socket went away while we wrote
            pass
        finally:
            watcher.cancel()
            self._record()
            pending = self._release()
            if pending is not None:
                # Shielded: the request task may itself be cancelled (server shutdown).
                await asyncio.shield(pending)

    def _release(self) -> Coroutine[Any, Any, None] | None:
        """The request is over: stop listening; returns what is left to await (cancelling
        a job that did not end), if anything. Most requests end settled and need nothing
        awaited: a shield costs a task, which they are spared."""
        self.router.unregister(self.spec.job_id)
        if self._settled:
            return None
        return self._cancel("client disconnected")

    def _record(self) -> None:
        """Count the request and its latencies: in memory only, flushed in the background."""
        recorder = self.recorder
        if recorder is None:
            return
        labels = request_labels(self.spec, self.dialect, self.outcome)
        recorder.count("req", labels)
        end = time.perf_counter()
        recorder.observe("total", labels, end - self.started)
        if self.first_at:
            recorder.observe("ttft", labels, self.first_at - self.started)

    async def _answer(self, send: Send) -> None:
        try:
            first = await self._next()
        except JobTimeout:
            self.outcome = "timeout"
            await self._cancel(f"no node answered within {self.timeout:g}s", expired=True)
            await self._send_error(
                send, f"timed out after {self.timeout:g}s waiting for a node", 504
            )
            return
        if first is DISCONNECTED:
            return
        self.first_at = time.perf_counter()
        if first.type == protocol.ERROR:
            self.outcome = "error"
            self._settled = True
            message, status = protocol.parse_error(first.payload)
            await self._send_error(send, message, status)
            return
        if not self.spec.stream:
            self._settled = first.final
            self.outcome = "done"
            body = self.dialect.single(first.payload)
            await _start(send, 200, JSON_TYPE, self.extra_headers, len(body))
            await send({"type": "http.response.body", "body": body})
            if self.on_done is not None and first.final:
                await self.on_done(first.payload)
            return
        await self._stream(send, first)

    async def _stream(self, send: Send, reply: Reply) -> None:
        """Write a streamed job's chunks in sequence order, each once, then its end.

        Replies can arrive out of order and twice: after the reply subscription was lost,
        the chunks published since it came back arrive live while the ones missed are
        replayed from Redis. So a chunk ahead of its turn waits in ``early`` until the gap
        before it is filled, and a chunk already written is dropped.
        """
        media = self.dialect.stream_media_type.encode()
        await _start(send, 200, media, self.extra_headers, None)
        expected = 0
        early: dict[int, Reply] = {}
        while True:
            if reply is DISCONNECTED:
                return
            if reply.seq >= expected or reply.final:
                early.setdefault(reply.seq, reply)
            while True:
                ready = early.pop(expected, None)
                final = next((r for r in early.values() if r.final and _due(r, expected)), None)
                if ready is not None and not ready.final:
                    body = self.dialect.chunk(ready.payload)
                    expected += 1
                    if body:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    continue
                final = ready if ready is not None else final
                if final is None:
                    break
                self._settled = True
                if final.type == protocol.DONE:
                    self.outcome = "done"
                    body = self.dialect.last(final.payload)
                else:
                    self.outcome = "error"
                    body = self.dialect.stream_error(*protocol.parse_error(final.payload))
                await send({"type": "http.response.body", "body": body})
                if self.on_done is not None and final.type == protocol.DONE:
                    await self.on_done(final.payload)
                return
            try:
                reply = await self._next()
            except JobTimeout:
                self.outcome = "timeout"
                await self._cancel(f"no output for {self.timeout:g}s", expired=True)
                body = self.dialect.stream_error(f"no output for {self.timeout:g}s", 504)
                self._settled = True
                await send({"type": "http.response.body", "body": body})
                return

    async def _next(self) -> Reply:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.queue.get()
        except TimeoutError as exc:
            raise JobTimeout from exc

    async def _watch_client(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self.queue.put_nowait(DISCONNECTED)
                return

    async def _cancel(self, reason: str, *, expired: bool = False) -> None:
        self._settled = True
        try:
            prior = await self.store.cancel(self.spec.job_id, reason, expired=expired)
        except (RedisError, OSError) as exc:  # a failed cancel must not fail the response
            log.warning("cancelling job %s failed: %s", self.spec.job_id, exc)
            return
        log.info("job %s cancelled (%s) while %s", self.spec.job_id, reason, prior)

    async def _send_error(self, send: Send, message: str, status: int) -> None:
        body = self.dialect.error_body(message, status)
        await _start(send, status, JSON_TYPE, self.extra_headers, len(body))
        await send({"type": "http.response.body", "body": body})


async def _start(
    send: Send, status: int, media: bytes, headers: list[tuple[bytes, bytes]], length: int | None
) -> None:
    raw = [(b"content-type", media), *headers]
    if length is not None:
        raw.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})


def request_labels(spec: JobSpec, dialect: Dialect, outcome: str) -> tuple[str, str, str, str]:
    """The labels a request is counted under (model, priority, dialect, outcome)."""
    return (spec.model, str(spec.priority), dialect.name, outcome)
