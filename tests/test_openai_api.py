"""The official ``openai`` client, pointed at the gateway's ``/v1``, works as against Ollama."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import ollama
import openai
import pytest
from redis.asyncio import Redis

from corral import keys
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import record_requests

StartCluster = Callable[..., Awaitable[LocalCluster]]

LOOKUP_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "look something up",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


def _client(cluster: LocalCluster, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=cluster.url + "/v1", api_key=options.pop("api_key", "x"), max_retries=0, **options
    )


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[openai.AsyncOpenAI]:
    async with _client(cluster) as value:
        yield value


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def _poll(check: Callable[[], Awaitable[bool]], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # polling interval, with a deadline


async def _enqueued(redis: Redis) -> int:
    return int(await redis.hget(keys.STATS, "enqueued") or 0)


# --- chat completions ---


async def test_chat_non_streaming(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model="llama3", messages=_user("hello corral"))
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "llama3" and reply.system_fingerprint == "fp_ollama"
    assert reply.created > 0
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo: hello corral"
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 3)
    assert reply.usage.total_tokens == 5


async def test_chat_streaming_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="llama3",
        messages=_user("one two three"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, usage = chunks
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == "echo: one two three"
    reasons = [c.choices[0].finish_reason for c in content]
    assert reasons == [None] * (len(content) - 1) + ["stop"]
    assert all(c.usage is None for c in content)
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (3, 4)


async def test_chat_streaming_without_usage_and_length_limit(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="llama3", messages=_user("a b c d e"), stream=True, max_tokens=3
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: a b"
    assert chunks[-1].choices[0].finish_reason == "length"
    reply = await client.chat.completions.create(
        model="llama3", messages=_user("a b c d e"), max_completion_tokens=2
    )
    assert reply.choices[0].message.content == "echo: a"
    assert reply.choices[0].finish_reason == "length"


async def test_chat_content_parts_and_options(client: openai.AsyncOpenAI) -> None:
    pixel = base64.b64encode(b"\x89PNG fake image").decode()
    messages: Any = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "describe this"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
            ],
        },
    ]
    reply = await client.chat.completions.create(
        model="llama3",
        messages=messages,
        temperature=0.2,
        top_p=0.9,
        seed=7,
        stop=["\n"],
        frequency_penalty=0.1,
        presence_penalty=0.1,
    )
    assert reply.choices[0].message.content == "echo: describe this"


async def test_response_format_json(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="llama3", messages=_user("make json"), response_format={"type": "json_object"}
    )
    assert json.loads(reply.choices[0].message.content or "") == {"echo": "make json"}
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    reply = await client.chat.completions.create(
        model="llama3",
        messages=_user("schema please"),
        response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"echo": "schema please"}


async def test_reasoning_effort_asks_for_thinking(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="llama3", messages=_user("why"), reasoning_effort="low"
    )
    message: Any = reply.choices[0].message
    assert message.content == "echo: why" and message.reasoning == "thinking: why"


# --- tool calls ---


async def test_tool_calls_non_streaming_and_round_trip(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="llama3", messages=_user("weather"), tools=[LOOKUP_TOOL]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call: Any = choice.message.tool_calls[0]
    assert call.type == "function" and call.id
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"query": "weather"}
    # The call and its result go back as OpenAI messages; Ollama gets objects, not strings.
    messages: Any = [
        *_user("weather"),
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        *_user("thanks"),
    ]
    follow = await client.chat.completions.create(model="llama3", messages=messages)
    assert follow.choices[0].message.content == "echo: thanks"


async def test_tool_calls_streaming(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="llama3", messages=_user("weather"), tools=[LOOKUP_TOOL], stream=True
    )
    chunks = [chunk async for chunk in stream]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id
    assert calls[0].function is not None and calls[0].function.name == "lookup"
    assert json.loads(calls[0].function.arguments or "") == {"query": "weather"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# --- completions and embeddings ---


async def test_completions(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model="llama3", prompt="one two three")
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == "echo: one two three"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    stream = await client.completions.create(
        model="qwen2:0.5b",
        prompt="four five",
        stream=True,
        max_tokens=2,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *parts, usage = chunks
    assert "".join(c.choices[0].text for c in parts) == "echo: four"
    assert parts[-1].choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 2


async def test_embeddings_single_list_and_base64(client: openai.AsyncOpenAI) -> None:
    one = await client.embeddings.create(model="nomic-embed-text", input="alpha")
    assert one.object == "list" and one.model == "nomic-embed-text"
    assert len(one.data) == 1 and one.data[0].index == 0 and len(one.data[0].embedding) == 16
    assert one.usage.prompt_tokens == one.usage.total_tokens == 1
    many = await client.embeddings.create(model="nomic-embed-text", input=["alpha", "beta"])
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == one.data[0].embedding
    assert many.data[1].embedding != one.data[0].embedding
    raw = await client.post(
        "/embeddings",
        body={"model": "nomic-embed-text", "input": "alpha", "encoding_format": "base64"},
        cast_to=httpx.Response,
    )
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert floats == pytest.approx(one.data[0].embedding, abs=1e-6)


# --- models ---


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    listed = [m async for m in client.models.list()]
    names = {"llama3:latest", "qwen2:0.5b", "nomic-embed-text:latest"}
    assert {m.id for m in listed} == names
    assert all(m.object == "model" and m.owned_by == "library" for m in listed)
    assert all(m.created > 0 for m in listed)
    one = await client.models.retrieve("qwen2:0.5b")
    assert one.id == "qwen2:0.5b" and one.object == "model" and one.owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


# --- errors ---


async def test_unknown_model_is_404(client: openai.AsyncOpenAI, redis: Redis) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="no-such-model", messages=_user("hi"))
    body: Any = caught.value.body
    assert body["type"] == "not_found_error" and "no-such-model" in body["message"]
    assert await _enqueued(redis) == 0


async def test_node_errors_keep_their_status(client: openai.AsyncOpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="nomic-embed-text", messages=_user("hi"), stream=stream
            )
        assert "does not support chat" in caught.value.message


BAD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/chat/completions", {"messages": _user("hi")}),
    ("/chat/completions", {"model": 3, "messages": _user("hi")}),
    ("/chat/completions", {"model": "llama3"}),
    ("/chat/completions", {"model": "llama3", "messages": []}),
    ("/chat/completions", {"model": "llama3", "messages": "hi"}),
    ("/chat/completions", {"model": "llama3", "messages": [{"content": "no role"}]}),
    ("/chat/completions", {"model": "llama3", "messages": [{"role": "user", "content": 5}]}),
    ("/chat/completions", {"model": "llama3", "messages": _user("hi"), "stream": "yes"}),
    ("/chat/completions", {"model": "llama3", "messages": _user("hi"), "temperature": "hot"}),
    ("/chat/completions", {"model": "llama3", "messages": _user("hi"), "max_tokens": 1.5}),
    ("/chat/completions", {"model": "llama3", "messages": _user("hi"), "stop": [1]}),
    ("/chat/completions", {"model": "llama3", "messages": _user("hi"), "tools": {}}),
    (
        "/chat/completions",
        {"model": "llama3", "messages": _user("hi"), "response_format": {"type": "xml"}},
    ),
    (
        "/chat/completions",
        {
            "model": "llama3",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": "http://x/a.png"}]}
            ],
        },
    ),
    (
        "/chat/completions",
        {
            "model": "llama3",
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
                }
            ],
        },
    ),
    ("/completions", {"model": "llama3"}),
    ("/completions", {"model": "llama3", "prompt": "hi", "stream_options": 1}),
    ("/embeddings", {"model": "nomic-embed-text"}),
    ("/embeddings", {"model": "nomic-embed-text", "input": []}),
    ("/embeddings", {"model": "nomic-embed-text", "input": [[1, 2, 3]]}),
    ("/embeddings", {"model": "nomic-embed-text", "input": "a", "encoding_format": "hex"}),
]


async def test_bad_requests_are_400_and_never_queued(
    client: openai.AsyncOpenAI, redis: Redis
) -> None:
    for path, body in BAD_REQUESTS:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.post(path, body=body, cast_to=httpx.Response)
        error: Any = caught.value.body
        assert error["type"] == "invalid_request_error", (path, body)
        assert error["message"], (path, body)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="llama3", messages=_user("hi"), extra_headers={"X-Corral-Priority": "12"}
        )
    assert await _enqueued(redis) == 0
    assert not await redis.exists(keys.stream("llama3:latest", 5))


WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    (
        "/chat/completions",
        {"max_tokens": "lots"},
        "invalid 'max_tokens': expected an integer, got a string",
    ),
    (
        "/completions",
        {"max_tokens": "lots"},
        "invalid 'max_tokens': expected an integer, got a string",
    ),
    (
        "/chat/completions",
        {"temperature": "hot"},
        "invalid 'temperature': expected a number, got a string",
    ),
    (
        "/completions",
        {"temperature": "hot"},
        "invalid 'temperature': expected a number, got a string",
    ),
    (
        "/chat/completions",
        {"stop": 5},
        "invalid 'stop': expected a string or an array, got an integer",
    ),
    ("/completions", {"stop": 5}, "invalid 'stop': expected a string or an array, got an integer"),
    ("/chat/completions", {"seed": 1.5}, "invalid 'seed': expected an integer, got a float"),
    (
        "/chat/completions",
        {"stream_options": {"include_usage": "yes"}},
        "invalid 'stream_options.include_usage': expected a boolean, got a string",
    ),
    (
        "/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        "invalid 'messages[0].content': expected a string or an array, got an integer",
    ),
    (
        "/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]},
        "invalid 'messages[0].content[0].image_url': expected a string or an object, "
        "got an integer",
    ),
    (
        "/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
        "invalid 'messages[0].content[0].type': expected one of 'text', 'image_url', got 'audio'",
    ),
    (
        "/chat/completions",
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
        "messages[0].tool_calls[0].function.name is required",
    ),
    (
        "/chat/completions",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format.json_schema.schema is required",
    ),
    (
        "/chat/completions",
        {"reasoning_effort": "max"},
        "invalid 'reasoning_effort': expected one of 'high', 'low', 'medium', 'none', got 'max'",
    ),
    (
        "/chat/completions",
        {"messages": [{"role": "user"}]},
        "messages[0].content is required (it may be left out only beside tool_calls)",
    ),
    ("/completions", {"prompt": ["a", "b"]}, "invalid 'prompt': expected a string, got an array"),
    ("/embeddings", {"input": [[1, 2, 3]]}, "invalid 'input[0]': expected a string, got an array"),
    ("/embeddings", {"dimensions": "8"}, "invalid 'dimensions': expected an integer, got a string"),
]
_VALID = {
    "/chat/completions": {"model": "llama3", "messages": _user("hi")},
    "/completions": {"model": "llama3", "prompt": "hi"},
    "/embeddings": {"model": "nomic-embed-text", "input": "hi"},
}


@pytest.mark.parametrize(("path", "fields", "message"), WRONG_TYPES)
async def test_wrong_types_name_the_field_in_openai_errors(
    cluster: LocalCluster, redis: Redis, path: str, fields: dict[str, Any], message: str
) -> None:
    async with httpx.AsyncClient(base_url=cluster.url + "/v1", timeout=10) as http:
        response = await http.post(path, json={**_VALID[path], **fields})
    assert response.status_code == 400
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    assert response.json() == {"error": error}
    assert await _enqueued(redis) == 0


async def test_translation_is_forwarded_with_numbers_as_sent(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked, then translated from the body as sent: integers stay integers, and fields
    Corral does not translate (``user``, ``n``) are left out as Ollama's layer leaves them."""
    body = {
        "model": "llama3",
        "messages": [{"role": "user", "content": "hi", "name": "me"}],
        "temperature": 1,
        "top_p": 0.5,
        "max_tokens": 4,
        "stop": "\n",
        "user": "someone",
        "n": 1,
        "response_format": {"type": "json_object"},
    }
    sent = record_requests(monkeypatch)
    async with httpx.AsyncClient(base_url=cluster.url + "/v1", timeout=10) as http:
        response = await http.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    forwarded = sent[response.headers["x-corral-job-id"]]
    assert forwarded == (
        b'{"model":"llama3:latest","messages":[{"role":"user","content":"hi"}],'
        b'"options":{"temperature":1,"top_p":0.5,"stop":["\\n"],"num_predict":4},'
        b'"format":"json","stream":true}'
    )


async def test_body_size_limit(start_cluster: StartCluster) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"max_body_bytes": 2048})
    async with _client(cluster) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="llama3", messages=_user("x" * 4096))
    assert caught.value.status_code == 413
    assert "too large" in caught.value.message


async def test_failure_mid_stream_is_an_error_event(start_cluster: StartCluster) -> None:
    # CORRAL_RESUME_STREAMS off; tests/test_resume.py covers the default (continued).
    cluster = await start_cluster(
        [FakeOllamaConfig(crash_after_tokens=2)], worker={"resume_streams": False}
    )
    async with _client(cluster) as client:
        stream = await client.chat.completions.create(
            model="llama3", messages=_user("one two three four"), stream=True
        )
        seen: list[str] = []
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "echo: one "  # two tokens, then the node died


async def test_queue_full_is_429(start_cluster: StartCluster, redis: Redis) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(token_rate=5)], slots=1, gateway={"max_queue": 1}
    )
    long = {"model": "llama3", "messages": _user("slow"), "max_tokens": 500}
    async with _client(cluster) as client:
        running = await client.chat.completions.create(**long, stream=True)  # first token out
        waiting = asyncio.create_task(client.chat.completions.create(**long))
        depth = keys.queued_count("llama3:latest")
        await _poll(lambda: _queued_is(redis, depth, 1), "the second job to queue")
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(**long)
        assert caught.value.response.headers["retry-after"] == "1"
        body: Any = caught.value.body
        assert body["type"] == "rate_limit_error"
        native = ollama.AsyncClient(host=cluster.url)
        with pytest.raises(ollama.ResponseError) as refused:
            await native.chat(model="llama3", messages=_user("slow"))
        assert refused.value.status_code == 503  # Ollama's own paths keep Ollama's status
        await native.close()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await running.close()


async def _queued_is(redis: Redis, key: str, value: int) -> bool:
    return int(await redis.get(key) or 0) == value


async def test_priority_from_header_and_api_key(start_cluster: StartCluster, redis: Redis) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"api_keys": "keyone:2,keytwo"})
    async with _client(cluster, api_key="wrong") as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="llama3", messages=_user("hi"))
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    cases = [
        ("keyone", {}, b"2"),  # the key's own priority
        ("keytwo", {}, b"5"),  # the default
        ("keyone", {"X-Corral-Priority": "0"}, b"0"),  # the header wins
    ]
    for key, headers, expected in cases:
        async with _client(cluster, api_key=key) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="llama3", messages=_user("hi"), extra_headers=headers
            )
            assert raw.parse().choices[0].message.content == "echo: hi"
        job = raw.headers["x-corral-job-id"]
        assert await redis.hget(keys.job(job), "prio") == expected


# --- both dialects at once ---


async def test_fifty_mixed_clients(cluster: LocalCluster) -> None:
    async def via_openai(index: int) -> tuple[str, str]:
        prompt = f"openai client number {index}"
        async with _client(cluster) as client:
            if index % 2:
                reply = await client.chat.completions.create(model="llama3", messages=_user(prompt))
                return prompt, reply.choices[0].message.content or ""
            stream = await client.chat.completions.create(
                model="llama3", messages=_user(prompt), stream=True
            )
            return prompt, "".join([c.choices[0].delta.content or "" async for c in stream])

    async def via_ollama(index: int) -> tuple[str, str]:
        prompt = f"ollama client number {index}"
        client = ollama.AsyncClient(host=cluster.url)
        try:
            if index % 2:
                reply = await client.chat(model="llama3", messages=_user(prompt))
                return prompt, reply.message.content or ""
            parts = await client.generate(model="llama3", prompt=prompt, stream=True)
            return prompt, "".join([p.response async for p in parts])
        finally:
            await client.close()

    calls = [via_openai(i) for i in range(25)] + [via_ollama(i) for i in range(25)]
    results = await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
    assert len({prompt for prompt, _ in results}) == 50
    for prompt, text in results:
        assert text == f"echo: {prompt}"
