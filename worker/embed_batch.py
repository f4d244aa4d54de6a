"""Embedding micro-batching: embed jobs for one model that a node runs together become one
``/api/embed`` call with a list input, whose embeddings are split back per job.

Jobs join a batch when their requests are equal but for ``input`` (same model, truncate,
options, keep_alive, dimensions). A batch is sent once the event loop has started every
job claimed with it (the claim loop starts them in one turn), or after ``window`` seconds
when that is set, so embeds that arrive a few milliseconds apart share a call too. Each
job still holds its own slot. Durations in each job's answer are the batch's, and
``prompt_eval_count`` is shared out in proportion to each job's inputs.

A job whose client leaves stops waiting; the call goes on for the others. A failed call
fails every job in it with the same error, but only the first job's failure is the
node's to count (``BatchError.echo`` marks the copies).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from corral.errors import BackendError

Post = Callable[[str, bytes], Awaitable[bytes]]
PATH = "/api/embed"


class EchoedError(BackendError):
    """The failure of a batch call, as seen by every job after the first."""


@dataclass
class _Member:
    request: bytes
    inputs: list[Any]
    future: asyncio.Future[bytes]


@dataclass
class _Batch:
    body: dict[str, Any]
    members: list[_Member] = field(default_factory=list)


class EmbedBatcher:
    def __init__(self, post: Post, *, window: float = 0.0) -> None:
        self.post = post
        self.window = window
        self._open: dict[bytes, _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0

    async def embed(self, request: bytes) -> bytes:
        """The answer to one ``/api/embed`` request, possibly sent as part of a batch."""
        body = orjson.loads(request)
        if not isinstance(body, dict) or "input" not in body:
            return await self.post(PATH, request)
        raw = body["input"]
        inputs = raw if isinstance(raw, list) else [raw]
        if not inputs:
            return await self.post(PATH, request)
        rest = {k: v for k, v in body.items() if k != "input"}
        key = orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(rest)
            task = asyncio.create_task(self._send(key), name="embed-batch")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        member = _Member(request, inputs, asyncio.get_running_loop().create_future())
        batch.members.append(member)
        # Shielded: a job that leaves must not cancel the call the others wait on.
        return await asyncio.shield(member.future)

    async def _send(self, key: bytes) -> None:
        if self.window > 0:
            await asyncio.sleep(self.window)
        else:
            # Two turns: every job started in the claim loop's turn has joined by then.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        batch = self._open.pop(key)
        members = batch.members
        try:
            if len(members) == 1:
                answers = [await self.post(PATH, members[0].request)]
            else:
                answers = await self._call(batch)
            self.calls += 1
        except asyncio.CancelledError:
            for member in members:
                if not member.future.done():
                    member.future.cancel()
            raise
        except Exception as exc:
            for n, member in enumerate(members):
                if member.future.done():
                    continue
                member.future.set_exception(exc if n == 0 else _echo(exc))
            return
        for member, answer in zip(members, answers, strict=True):
            if not member.future.done():
                member.future.set_result(answer)

    async def _call(self, batch: _Batch) -> list[bytes]:
        inputs = [text for member in batch.members for text in member.inputs]
        raw = await self.post(PATH, orjson.dumps({**batch.body, "input": inputs}))
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BackendError(
                "Ollama's /api/embed answer is not JSON", 502, retriable=True
            ) from exc
        vectors = answer.get("embeddings") if isinstance(answer, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(inputs):
            raise BackendError(
                f"Ollama's /api/embed answered {len(vectors or [])} embeddings for "
                f"{len(inputs)} inputs",
                502,
                retriable=True,
            )
        counted = answer.get("prompt_eval_count")
        out: list[bytes] = []
        at = 0
        for member in batch.members:
            n = len(member.inputs)
            part = {**answer, "embeddings": vectors[at : at + n]}
            if isinstance(counted, int):
                part["prompt_eval_count"] = round(counted * n / len(inputs))
            out.append(orjson.dumps(part))
            at += n
        return out


def _echo(exc: BaseException) -> BaseException:
    if isinstance(exc, BackendError):
        return EchoedError(exc.message, exc.status, retriable=exc.retriable)
    return exc
