"""A node's death in the middle of a streamed answer: another node continues it, and the
client, through the official clients of both dialects, reads one unbroken answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import ollama
import openai
import orjson
import pytest
from redis.asyncio import Redis

from corral import keys, protocol
from corral.jobs import ClaimedJob
from corral.keys import JobKind
from corral.tooling.cluster import LocalCluster, LocalNode
from corral.tooling.fake_ollama import FakeOllamaConfig
from corral.worker.resume import Partial, continuation, read_partial, summed_final
from tests.helpers import until

StartCluster = Callable[..., Awaitable[LocalCluster]]
PROMPT = "one two three four five six seven eight"
ANSWER = f"echo: {PROMPT}"
TOKENS = len(ANSWER.split())


async def _replace(cluster: LocalCluster, node: LocalNode, **worker: Any) -> None:
    """Take ``node`` out of the fleet and bring in a healthy one."""
    await node.stop()
    cluster.nodes.remove(node)
    await cluster.add_node(FakeOllamaConfig(token_rate=100), node_id="rescuer", **worker)


async def _cut_after_four_chunks(
    start_cluster: StartCluster, parts: list[Any], **worker: Any
) -> tuple[LocalCluster, LocalNode, asyncio.Task[None]]:
    """A streamed generate whose node's Ollama dies after four chunks, the node then
    replaced by a healthy one (the retry comes back after its 1 s backoff); returns the
    client's task, which collects what it reads into ``parts``."""
    cluster = await start_cluster(
        [FakeOllamaConfig(token_rate=100, crash_after_tokens=4)],
        worker=worker,
        scheduler={"retry_base": 1.0, "retry_cap": 1.0},
    )
    dying = cluster.nodes[0]

    async def ask() -> None:
        async with ollama.AsyncClient(host=cluster.url) as client:
            async for part in await client.generate(model="llama3", prompt=PROMPT, stream=True):
                parts.append(part)

    asked = asyncio.create_task(ask())
    await dying.fake.fake.wait_until(lambda s: s["failed"] >= 1)
    await _replace(cluster, dying, **worker)
    return cluster, dying, asked


async def test_a_generate_continues_on_another_node_after_its_ollama_died_mid_stream(
    start_cluster: StartCluster, redis: Redis
) -> None:
    parts: list[Any] = []
    cluster, dying, asked = await _cut_after_four_chunks(start_cluster, parts)
    await asyncio.wait_for(asked, 30)

    text = "".join(p.response for p in parts)
    assert text == ANSWER  # one unbroken answer: nothing repeated, nothing missing
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == TOKENS  # both attempts' tokens counted
    rescuer = cluster.nodes[0].fake.fake
    assert rescuer.stats()["completed"] == 1
    # The rescuer was asked to continue: the partial answer was in its request.
    assert len(parts) - 1 > 0 and dying.fake.fake.stats()["failed"] == 1


async def test_a_chat_continues_in_the_openai_dialect_after_its_node_stopped_mid_stream(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(token_rate=20)], worker={"drain_timeout": 0.0}, scheduler={}
    )
    leaving = cluster.nodes[0]
    async with openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="x", max_retries=0) as oa:
        stream = await oa.chat.completions.create(
            model="llama3",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:  # part of the answer is with the client: the node goes
                await _replace(cluster, leaving, drain_timeout=0.0)
    *content, usage = chunks
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in content][-1] == "stop"
    assert len({c.id for c in chunks}) == 1
    assert usage.usage is not None and usage.usage.completion_tokens == TOKENS


async def test_with_resumption_off_a_stream_cut_by_its_node_ends_with_an_error(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(token_rate=100, crash_after_tokens=4)],
        worker={"resume_streams": False},
        scheduler={"retry_base": 1.0, "retry_cap": 1.0},
    )
    async with ollama.AsyncClient(host=cluster.url) as client:
        with pytest.raises(ollama.ResponseError):
            async for _ in await client.generate(model="llama3", prompt=PROMPT, stream=True):
                pass


async def test_an_answer_longer_than_its_replay_list_ends_with_an_error_not_a_splice(
    start_cluster: StartCluster,
) -> None:
    # Two chunks kept for replay, four sent before the node's Ollama dies: the list no
    # longer says where the client is. Continued from the end of the list, the new
    # node's text would be spliced onto what the client read past it (this echoing fake
    # happens to write the same words again; a model does not).
    parts: list[Any] = []
    cluster, _, asked = await _cut_after_four_chunks(start_cluster, parts, replay_max_messages=2)
    with pytest.raises(ollama.ResponseError, match=r"past the 2 chunks .* cannot be continued"):
        await asyncio.wait_for(asked, 30)
    text = "".join(p.response for p in parts)
    assert len(parts) == 4 and ANSWER.startswith(text)  # what it had, then the error
    rescuer = cluster.nodes[0]
    assert rescuer.fake.fake.stats()["completed"] == 0  # no continuation was asked for
    assert rescuer.worker.breaker.total_failures == 0  # not the rescuer's failure


def test_a_partial_answer_is_read_in_order_each_chunk_once() -> None:
    def chunk(seq: int, text: str) -> bytes:
        return protocol.encode("j", seq, protocol.CHUNK, b'{"response":"%s"}' % text.encode())

    partial = read_partial([chunk(1, "b"), chunk(0, "a"), chunk(1, "b"), chunk(3, "gap")])
    assert partial.text(JobKind.GENERATE) == "ab" and partial.sent == 2


def test_a_generate_is_continued_as_the_equivalent_chat() -> None:
    partial = Partial([{"response": "echo: "}, {"response": "one "}])
    request = (
        b'{"model":"m","prompt":"p","system":"s","images":["i"],'
        b'"options":{"num_predict":5,"num_ctx":8},"stream":true}'
    )
    ask = continuation(JobKind.GENERATE, request, partial)
    body = orjson.loads(ask.request)
    assert ask.path == "/api/chat" and ask.as_generate
    assert body["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p", "images": ["i"]},
        {"role": "assistant", "content": "echo: one "},
    ]
    assert body["options"] == {"num_predict": 3, "num_ctx": 8}
    raw = continuation(JobKind.GENERATE, b'{"model":"m","prompt":"p","raw":true}', partial)
    assert orjson.loads(raw.request)["prompt"] == "pecho: one " and not raw.as_generate


def test_a_continued_answers_counts_keep_the_speed_it_was_generated_at() -> None:
    # 4 tokens in 0.5 s here, after 4 tokens another node streamed: 8 tokens at 8 tok/s,
    # not 8 tokens in 0.5 s (16 tok/s, as when only the count was summed).
    final = {"done": True, "eval_count": 4, "eval_duration": 500_000_000, "total_duration": 7e8}
    summed = summed_final(final, Partial([{"response": "x"}] * 4))
    assert summed["eval_count"] == 8
    assert summed["eval_duration"] == 1_000_000_000
    assert summed["total_duration"] == 1_200_000_000
    assert summed["eval_count"] / (summed["eval_duration"] / 1e9) == 8.0


async def test_a_chunk_goes_out_only_with_its_record_while_redis_refuses_writes(
    cluster: LocalCluster, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Under OOM a bare pipeline would publish the chunk while its list entry and the
    # job's "streamed" mark are refused: the client would hold output that no re-run or
    # continuation knows of.
    worker = cluster.nodes[0].worker
    job = ClaimedJob(
        job_id="oomjob", kind=JobKind.GENERATE, model="llama3:latest", priority=5,
        entry_id="0-1", request=b"{}", stream=True, gateway_id="gw-oom", attempt=1,
    )  # fmt: skip
    channel = keys.reply_channel("gw-oom")
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    message = protocol.encode("oomjob", 0, protocol.CHUNK, b'{"response":"a"}')
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")
    try:
        sending = asyncio.create_task(worker._forward(job, channel, message, seq=0))

        async def refused_twice() -> bool:
            return any("oomjob failed (try 2)" in r.getMessage() for r in caplog.records)

        await until(refused_twice, True, within=20)
        assert await pubsub.get_message(timeout=0.2) is None, "published without its record"
    finally:
        await redis.config_set("maxmemory", "0")
    await asyncio.wait_for(sending, 20)
    got = await pubsub.get_message(timeout=5.0)
    assert got is not None and got["data"] == message
    assert await redis.lrange(keys.output("oomjob"), 0, -1) == [message]
    assert await redis.hget(keys.job("oomjob"), "streamed") == b"1"
    await pubsub.aclose()  # type: ignore[no-untyped-call]
