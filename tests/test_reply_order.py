"""The order in which a gateway writes a streamed job's replies.

Chunks are written in sequence order, each once; the node's final message ends the
answer after the chunks before it; a final message whose sender could not know that
count (``protocol.UNSEQUENCED``: a claim ending a queued job, a cancel, a hand-back of a
job that already streamed, a reply rebuilt from the record) ends it whenever it comes.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from starlette.types import Message

from corral import protocol
from corral.gateway.dialect import OLLAMA
from corral.gateway.relay import JobResponse
from corral.gateway.replies import Inbox
from corral.jobs import JobSpec
from corral.keys import JobKind
from corral.protocol import Reply

JOB = "job-1"


def chunk(seq: int) -> Reply:
    return Reply(JOB, seq, protocol.CHUNK, b'{"n":%d}' % seq)


def done(seq: int) -> Reply:
    return Reply(JOB, seq, protocol.DONE, b'{"done":true}')


def error(seq: int, message: str = "boom") -> Reply:
    return Reply(JOB, seq, protocol.ERROR, protocol.error_payload(message, 503))


class _Router:
    def unregister(self, job_id: str) -> None:
        pass


async def _answer(*replies: Reply) -> list[bytes]:
    """The body a streaming client gets when ``replies`` arrive in this order."""
    return (await _respond(*replies))[1]


async def _respond(*replies: Reply) -> tuple[int, list[bytes]]:
    inbox = Inbox()
    for reply in replies:
        inbox.put_nowait(reply)
    spec = JobSpec(JobKind.GENERATE, "llama3:latest", b"{}", 5, "gw", stream=True, job_id=JOB)
    response = JobResponse(spec, cast(Any, None), cast(Any, _Router()), OLLAMA, inbox, 5.0)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    await response({"type": "http"}, receive, send)
    assert sent[-1].get("more_body", False) is False, "the answer was ended"
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, [m["body"] for m in sent if m["type"] == "http.response.body"]


async def test_chunks_are_written_in_order_once_and_the_final_after_them() -> None:
    body = await _answer(chunk(0), chunk(2), done(3), chunk(0), chunk(1))
    assert body == [b'{"n":0}\n', b'{"n":1}\n', b'{"n":2}\n', b'{"done":true}\n']


async def test_an_unsequenced_final_ends_the_answer_whenever_it_comes() -> None:
    # Chunk 2 never comes: the job was handed back after part of it was streamed.
    body = await _answer(chunk(0), chunk(1), chunk(3), error(protocol.UNSEQUENCED, "gone"))
    assert body == [b'{"n":0}\n', b'{"n":1}\n', b'{"error":"gone"}\n']


async def test_an_unsequenced_final_before_any_chunk_ends_the_answer() -> None:
    body = await _answer(chunk(1), error(protocol.UNSEQUENCED, "expired"))
    assert body == [b'{"error":"expired"}\n']


async def test_a_node_failure_is_final_at_its_own_count() -> None:
    # Before any output (seq 0): the client gets the error's own status, as from Ollama.
    assert await _respond(error(0)) == (503, [b'{"error":"boom"}'])
    # After two chunks: the error ends the stream after both, and not before.
    body = await _answer(chunk(0), error(2), chunk(1))
    assert body == [b'{"n":0}\n', b'{"n":1}\n', b'{"error":"boom"}\n']
    # Seq 0 is due with nothing written, whatever stray chunk came first.
    assert await _answer(chunk(5), error(0)) == [b'{"error":"boom"}\n']
