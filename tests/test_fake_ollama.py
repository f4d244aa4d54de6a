"""The fake Ollama server must look like Ollama to the official client and keep honest counts."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import ollama
import pytest

from corral.tooling.fake_ollama import (
    FakeOllama,
    FakeOllamaConfig,
    FakeOllamaServer,
    _config_from_args,
    _parser,
    start_fake_ollama,
)
from corral.tooling.fake_ollama_stats import fingerprint

RFC3339_NS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "web_search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]

StartServer = Callable[..., Awaitable[FakeOllamaServer]]


@pytest.fixture
async def start() -> AsyncIterator[StartServer]:
    """Start fake servers with config overrides; all are stopped after the test."""
    servers: list[FakeOllamaServer] = []

    async def _start(**overrides: Any) -> FakeOllamaServer:
        server = await start_fake_ollama(FakeOllamaConfig(**overrides))
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(start: StartServer) -> FakeOllamaServer:
    return await start()


@pytest.fixture
async def client(server: FakeOllamaServer) -> AsyncIterator[ollama.AsyncClient]:
    api = ollama.AsyncClient(host=server.url)
    yield api
    await api.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as session:
        yield session


def slow_generate(prompt: str = "slow") -> dict[str, Any]:
    """A request that streams for a long time unless token_rate is raised."""
    return {"model": "llama3", "prompt": prompt, "options": {"num_predict": 300}}


async def stream_in_background(
    http: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> asyncio.Task[list[dict[str, Any]]]:
    async def run() -> list[dict[str, Any]]:
        async with http.stream("POST", f"{url}/api/generate", json=body) as response:
            return [json.loads(line) async for line in response.aiter_lines() if line]

    return asyncio.create_task(run())


async def finish(fake: FakeOllama, *tasks: asyncio.Task[Any]) -> list[Any]:
    """Let slow requests run at full speed and collect them."""
    fake.configure(token_rate=0)
    return list(await asyncio.gather(*tasks))


# -- the basic wire format ---------------------------------------------------------------


async def test_root_version_and_unknown_path(
    server: FakeOllamaServer, http: httpx.AsyncClient
) -> None:
    root = await http.get(server.url)
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert (await http.head(server.url)).status_code == 200
    assert (await http.get(f"{server.url}/api/version")).json() == {"version": "0.12.6"}
    missing = await http.get(f"{server.url}/api/nope")
    assert missing.status_code == 404


async def test_generate_non_stream(client: ollama.AsyncClient) -> None:
    reply = await client.generate(model="llama3", prompt="hello  big world")
    assert reply.response == "echo: hello big world"
    assert reply.done and reply.done_reason == "stop"
    assert reply.model == "llama3"
    assert reply.created_at is not None and RFC3339_NS.match(reply.created_at)
    assert reply.eval_count == 4 and reply.prompt_eval_count == 3
    assert reply.context and all(isinstance(token, int) for token in reply.context)
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(reply[field], int)


async def test_generate_stream(client: ollama.AsyncClient) -> None:
    parts = [p async for p in await client.generate(model="llama3", prompt="a b", stream=True)]
    assert [p.response for p in parts[:-1]] == ["echo: ", "a ", "b"]
    assert not any(p.done for p in parts[:-1])
    final = parts[-1]
    assert final.done and final.done_reason == "stop" and final.response == ""
    assert final.eval_count == 3 and final.context


async def test_wire_headers_and_fields(server: FakeOllamaServer, http: httpx.AsyncClient) -> None:
    url = f"{server.url}/api/generate"
    streamed = await http.post(url, json={"model": "llama3", "prompt": "x"})
    assert streamed.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert list(lines[0]) == ["model", "created_at", "response", "done"]
    assert list(lines[-1]) == [
        "model",
        "created_at",
        "response",
        "done",
        "done_reason",
        "context",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ]
    single = await http.post(url, json={"model": "llama3", "prompt": "x", "stream": False})
    assert single.headers["content-type"] == "application/json; charset=utf-8"
    assert single.json()["response"] == "echo: x"


async def test_num_predict_cycles_cuts_and_zero(client: ollama.AsyncClient) -> None:
    longer = await client.generate(model="llama3", prompt="a b", options={"num_predict": 5})
    assert (longer.response, longer.done_reason, longer.eval_count) == (
        "echo: a b echo: a",
        "length",
        5,
    )
    shorter = await client.generate(model="llama3", prompt="a b c", options={"num_predict": 2})
    assert (shorter.response, shorter.done_reason) == ("echo: a", "length")
    parts = [
        p
        async for p in await client.generate(
            model="llama3", prompt="a", options={"num_predict": 0}, stream=True
        )
    ]
    assert len(parts) == 1 and parts[0].done and parts[0].response == ""
    assert parts[0].eval_count == 0


async def test_load_only_and_unload(client: ollama.AsyncClient, server: FakeOllamaServer) -> None:
    loaded = await client.generate(model="qwen2:0.5b", prompt="")
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert [m.model for m in (await client.ps()).models] == ["qwen2:0.5b"]
    unloaded = await client.generate(model="qwen2:0.5b", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert (await client.ps()).models == []
    assert server.fake.stats()["started"] == []  # loading is not a generation


async def test_keep_alive_zero_unloads_after_request(client: ollama.AsyncClient) -> None:
    await client.generate(model="llama3", prompt="hi", keep_alive=0)
    assert (await client.ps()).models == []


async def test_chat_stream_and_not(client: ollama.AsyncClient) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "how are you"},
    ]
    reply = await client.chat(model="llama3", messages=messages)
    assert reply.message.role == "assistant"
    assert reply.message.content == "echo: how are you"
    assert reply.done_reason == "stop" and reply.eval_count == 4
    assert "context" not in reply.model_fields_set
    parts = [p async for p in await client.chat(model="llama3", messages=messages, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == "echo: how are you"
    assert parts[-1].done and parts[-1].message.content == ""
    assert not any(p.done for p in parts[:-1])


async def test_chat_thinking(client: ollama.AsyncClient) -> None:
    messages = [{"role": "user", "content": "why"}]
    parts = [
        p
        async for p in await client.chat(model="llama3", messages=messages, think=True, stream=True)
    ]
    thinking = [i for i, p in enumerate(parts) if p.message.thinking]
    content = [i for i, p in enumerate(parts) if p.message.content]
    assert thinking and content and max(thinking) < min(content)
    assert "".join(p.message.thinking or "" for p in parts) == "thinking: why"
    whole = await client.chat(model="llama3", messages=messages, think=True)
    assert (whole.message.thinking, whole.message.content) == ("thinking: why", "echo: why")
    generated = await client.generate(model="llama3", prompt="why", think=True)
    assert generated.thinking == "thinking: why"


async def test_chat_tools(client: ollama.AsyncClient) -> None:
    messages = [{"role": "user", "content": "weather in Paris"}]
    reply = await client.chat(model="llama3", messages=messages, tools=TOOLS)
    assert reply.message.content == ""
    assert reply.message.tool_calls is not None
    call = reply.message.tool_calls[0].function
    assert (call.name, dict(call.arguments)) == ("web_search", {"query": "weather in Paris"})
    parts = [
        p
        async for p in await client.chat(
            model="llama3", messages=messages, tools=TOOLS, stream=True
        )
    ]
    assert any(p.message.tool_calls for p in parts) and parts[-1].done


async def test_format_json(client: ollama.AsyncClient) -> None:
    messages = [{"role": "user", "content": 'say "hi" twice'}]
    parts = [
        p
        async for p in await client.chat(
            model="llama3", messages=messages, format="json", stream=True
        )
    ]
    assert len(parts) > 2  # streamed in pieces
    text = "".join(p.message.content or "" for p in parts)
    assert json.loads(text) == {"echo": 'say "hi" twice'}
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    generated = await client.generate(model="llama3", prompt="p", format=schema)
    assert json.loads(generated.response) == {"echo": "p"}


async def test_embed_single_list_and_legacy(client: ollama.AsyncClient) -> None:
    one = await client.embed(model="nomic-embed-text", input="hello")
    many = await client.embed(model="nomic-embed-text", input=["hello", "world"])
    assert one.model == "nomic-embed-text"
    assert len(one.embeddings) == 1 and len(many.embeddings) == 2
    assert list(one.embeddings[0]) == list(many.embeddings[0])  # deterministic
    assert many.embeddings[0] != many.embeddings[1]
    assert len(one.embeddings[0]) == 16
    assert math.isclose(sum(x * x for x in one.embeddings[0]), 1.0, rel_tol=1e-9)
    assert isinstance(one.total_duration, int) and one.prompt_eval_count == 1
    legacy = await client.embeddings(model="nomic-embed-text", prompt="hello")
    assert len(legacy.embedding) == 16
    # Ollama lets chat models embed too.
    assert len((await client.embed(model="llama3", input="x")).embeddings) == 1


async def test_embedding_dimension_is_configurable(start: StartServer) -> None:
    server = await start(embedding_dim=8)
    api = ollama.AsyncClient(host=server.url)
    try:
        reply = await api.embed(model="nomic-embed-text", input="hi")
        assert len(reply.embeddings[0]) == 8
    finally:
        await api.close()


async def test_embedding_model_cannot_generate_or_chat(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as generate:
        await client.generate(model="nomic-embed-text", prompt="hi")
    assert generate.value.status_code == 400
    assert generate.value.error == '"nomic-embed-text" does not support generate'
    with pytest.raises(ollama.ResponseError) as chat:
        await client.chat(model="nomic-embed-text", messages=[{"role": "user", "content": "x"}])
    assert chat.value.error == '"nomic-embed-text" does not support chat'


async def test_list_ps_show(client: ollama.AsyncClient) -> None:
    listed = await client.list()
    assert [m.model for m in listed.models] == [
        "llama3:latest",
        "qwen2:0.5b",
        "nomic-embed-text:latest",
    ]
    first = listed.models[0]
    assert first.details is not None and first.details.format == "gguf"
    assert first.digest and first.size and first.modified_at
    assert (await client.ps()).models == []
    await client.generate(model="llama3", prompt="hi", options={"num_ctx": 2048})
    running = (await client.ps()).models
    assert [(m.name, m.context_length) for m in running] == [("llama3:latest", 2048)]
    assert running[0].expires_at is not None and running[0].size_vram
    shown = await client.show("llama3")
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo and shown.template and shown.modelfile and shown.details
    embed = await client.show("nomic-embed-text")
    assert embed.capabilities == ["embedding"]


async def test_management_endpoints(client: ollama.AsyncClient, server: FakeOllamaServer) -> None:
    assert (await client.pull("tinyllama")).status == "success"
    await client.copy("tinyllama", "tiny-copy")
    assert (await client.create(model="mine", from_="llama3")).status == "success"
    names = [m.model for m in (await client.list()).models]
    assert {"tinyllama:latest", "tiny-copy:latest", "mine:latest"} <= set(names)
    assert (await client.delete("tiny-copy")).status == "success"
    assert "tiny-copy:latest" not in [m.model for m in (await client.list()).models]
    assert (await client.generate(model="tinyllama", prompt="x")).response == "echo: x"
    requests = server.fake.stats()["requests"]
    assert requests["/api/pull"] == 1 and requests["/api/delete"] == 1


# -- errors -------------------------------------------------------------------------------


async def test_error_answers(
    client: ollama.AsyncClient, server: FakeOllamaServer, http: httpx.AsyncClient
) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        await client.generate(model="mystery", prompt="hi")
    assert unknown.value.status_code == 404
    assert unknown.value.error == 'model "mystery" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as streamed:
        async for _ in await client.chat(model="mystery", messages=[], stream=True):
            pass
    assert streamed.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as show:
        await client.show("mystery")
    assert show.value.status_code == 404

    missing = await http.post(f"{server.url}/api/generate", json={"prompt": "hi"})
    assert (missing.status_code, missing.json()) == (400, {"error": "model is required"})
    broken = await http.post(f"{server.url}/api/chat", content=b"{not json")
    assert broken.status_code == 400 and "invalid JSON" in broken.json()["error"]
    empty = await http.post(f"{server.url}/api/embed", content=b"")
    assert empty.json() == {"error": "missing request body"}
    stats = server.fake.stats()
    assert stats["failed"] == 5 and stats["completed"] == 0


async def test_queue_full_is_503(start: StartServer, http: httpx.AsyncClient) -> None:
    server = await start(max_queue=1, token_rate=50)
    fake = server.fake
    running = await stream_in_background(http, server.url, slow_generate("a"))
    await fake.wait_until(lambda s: s["active"] == 1)
    queued = await stream_in_background(http, server.url, slow_generate("b"))
    await fake.wait_until(lambda s: s["waiting"] == 1)
    api = ollama.AsyncClient(host=server.url)
    try:
        with pytest.raises(ollama.ResponseError) as full:
            await api.generate(model="llama3", prompt="c")
    finally:
        await api.close()
    assert full.value.status_code == 503 and full.value.error == QUEUE_FULL
    done = await finish(fake, running, queued)
    assert all(lines[-1]["done"] for lines in done)
    assert fake.stats()["failed"] == 1


# -- scheduling -----------------------------------------------------------------------------


async def test_parallel_slot_limit(start: StartServer) -> None:
    server = await start(num_parallel=2, token_rate=400)
    api = ollama.AsyncClient(host=server.url)
    try:
        replies = await asyncio.gather(
            *(
                api.generate(model="llama3", prompt=f"p{i}", options={"num_predict": 4})
                for i in range(10)
            )
        )
    finally:
        await api.close()
    assert sorted(r.response for r in replies) == sorted(
        f"echo: p{i} echo: p{i}" for i in range(10)
    )
    stats = server.fake.stats()
    assert stats["max_active"] == 2
    assert stats["models"]["llama3:latest"]["max_active"] == 2
    assert (stats["completed"], stats["active"], stats["waiting"]) == (10, 0, 0)
    assert stats["requests"] == {"/api/generate": 10}
    assert len(stats["started"]) == 10


async def test_waiting_requests_are_served_in_arrival_order(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(token_rate=50)
    fake = server.fake
    tasks = []
    for i, prompt in enumerate(["first", "second", "third", "fourth"]):
        tasks.append(await stream_in_background(http, server.url, slow_generate(prompt)))
        await fake.wait_until(lambda s, n=i: s["waiting"] == n and s["active"] == 1)
    await finish(fake, *tasks)
    order = [entry["prompt"] for entry in fake.stats()["started"]]
    assert order == ["first", "second", "third", "fourth"]


async def test_load_delay_eviction_and_num_ctx_reload(start: StartServer) -> None:
    server = await start(max_loaded_models=1, load_delay=0.05)
    api = ollama.AsyncClient(host=server.url)
    try:
        first = await api.generate(model="llama3", prompt="a")
        assert first.load_duration is not None and first.load_duration >= 40_000_000
        again = await api.generate(model="llama3", prompt="a")
        assert again.load_duration == 0  # already loaded
        await api.generate(model="qwen2:0.5b", prompt="b")
        assert [m.model for m in (await api.ps()).models] == ["qwen2:0.5b"]
        await api.generate(model="qwen2:0.5b", prompt="b", options={"num_ctx": 8192})
        assert [m.context_length for m in (await api.ps()).models] == [8192]
    finally:
        await api.close()
    stats = server.fake.stats()
    assert (stats["loads"], stats["evictions"]) == (3, 2)
    assert stats["models"]["llama3:latest"]["loads"] == 1
    assert stats["models"]["qwen2:0.5b"]["loads"] == 2


async def test_load_waits_until_a_model_is_idle(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(max_loaded_models=1, token_rate=50)
    fake = server.fake
    busy = await stream_in_background(http, server.url, slow_generate())
    await fake.wait_until(lambda s: s["active"] == 1)
    other = await stream_in_background(
        http, server.url, {"model": "qwen2:0.5b", "prompt": "later", "stream": False}
    )
    await fake.wait_until(lambda s: s["waiting"] == 1)
    assert fake.stats()["loads"] == 1  # no room: nothing was evicted from under a request
    await finish(fake, busy, other)
    stats = fake.stats()
    assert (stats["loads"], stats["evictions"]) == (2, 1)


async def test_preloaded_models_need_no_load(start: StartServer) -> None:
    server = await start(preloaded=["llama3"], load_delay=5)
    api = ollama.AsyncClient(host=server.url)
    try:
        assert [m.model for m in (await api.ps()).models] == ["llama3:latest"]
        assert (await api.generate(model="llama3", prompt="x")).response == "echo: x"
    finally:
        await api.close()
    assert server.fake.stats()["loads"] == 0


# -- failure injection and disconnects --------------------------------------------------------


async def test_fail_next_then_recover(start: StartServer) -> None:
    server = await start(fail_next=1)
    api = ollama.AsyncClient(host=server.url)
    try:
        with pytest.raises(ollama.ResponseError) as failed:
            await api.generate(model="llama3", prompt="x")
        assert failed.value.status_code == 500 and failed.value.error
        assert (await api.generate(model="llama3", prompt="x")).response == "echo: x"
        server.fake.configure(fail_rate=1.0, fail_status=503)
        with pytest.raises(ollama.ResponseError) as busy:
            await api.embed(model="nomic-embed-text", input="x")
        assert busy.value.status_code == 503
    finally:
        await api.close()
    stats = server.fake.stats()
    assert (stats["failed"], stats["completed"]) == (2, 1)


async def test_crash_after_tokens_breaks_the_stream(start: StartServer) -> None:
    server = await start(crash_after_tokens=2)
    api = ollama.AsyncClient(host=server.url)
    parts: list[ollama.GenerateResponse] = []
    try:
        with pytest.raises(httpx.TransportError):
            async for part in await api.generate(model="llama3", prompt="a b c d", stream=True):
                parts.append(part)
    finally:
        await api.close()
    assert [p.response for p in parts] == ["echo: ", "a "]
    # Counted, and the slot freed, before the connection dropped.
    stats = server.fake.stats()
    assert stats["active"] == 0 and stats["failed"] == 1
    assert (stats["completed"], stats["disconnects"]) == (0, 0)


async def test_hang_until_client_leaves(start: StartServer, http: httpx.AsyncClient) -> None:
    server = await start(hang=True)
    fake = server.fake
    body = {"model": "llama3", "prompt": "x", "stream": False}
    request = asyncio.create_task(http.post(f"{server.url}/api/generate", json=body))
    await fake.wait_until(lambda s: s["requests"].get("/api/generate") == 1)
    done, _ = await asyncio.wait((request,), timeout=0.05)
    assert not done  # accepted, never answered
    request.cancel()  # the client gives up and closes its connection
    stats = await fake.wait_until(lambda s: s["disconnects"] == 1)
    assert (stats["completed"], stats["failed"]) == (0, 0)
    with pytest.raises(asyncio.CancelledError):
        await request


async def test_disconnect_mid_stream_frees_the_slot(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(token_rate=20)
    body = slow_generate()
    async with http.stream("POST", f"{server.url}/api/generate", json=body) as response:
        async for line in response.aiter_lines():
            assert json.loads(line)["response"] == "echo: "
            break
    stats = await server.fake.wait_until(
        lambda s: s["active"] == 0 and s["disconnects"] == 1, within=1.0
    )
    assert stats["completed"] == 0
    assert server.fake.scheduler.instances["llama3:latest"].busy == 0


async def test_disconnect_while_waiting_frees_the_queue_place(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(token_rate=50)
    fake = server.fake
    running = await stream_in_background(http, server.url, slow_generate())
    await fake.wait_until(lambda s: s["active"] == 1)
    waiting = await stream_in_background(http, server.url, slow_generate("gives up"))
    await fake.wait_until(lambda s: s["waiting"] == 1)
    waiting.cancel()
    await fake.wait_until(lambda s: s["waiting"] == 0 and s["disconnects"] == 1, within=1.0)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await finish(fake, running)
    assert [e["prompt"] for e in fake.stats()["started"]] == ["slow"]


async def test_disconnect_while_the_model_loads(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(load_delay=30)
    fake = server.fake
    body = {"model": "llama3", "prompt": "x", "stream": False}
    request = asyncio.create_task(http.post(f"{server.url}/api/generate", json=body))
    await fake.wait_until(lambda s: s["loads"] == 1 and s["waiting"] == 1)
    request.cancel()
    stats = await fake.wait_until(lambda s: s["waiting"] == 0 and s["disconnects"] == 1)
    assert stats["started"] == [] and fake.scheduler.instances["llama3:latest"].busy == 0
    with pytest.raises(asyncio.CancelledError):
        await request


async def test_stop_aborts_open_streams(start: StartServer, http: httpx.AsyncClient) -> None:
    server = await start(token_rate=50)
    running = await stream_in_background(http, server.url, slow_generate())
    await server.fake.wait_until(lambda s: s["active"] == 1)
    await server.stop()
    with pytest.raises(httpx.TransportError):
        await running


# -- garbage answers, a slow /api/ps, and the run registry ---------------------------------


async def stream_raw(http: httpx.AsyncClient, url: str, prompt: str) -> tuple[int, str, list[str]]:
    """Status, content type and the raw lines of a streamed generate, as they came."""
    body = {"model": "llama3", "prompt": prompt}
    async with http.stream("POST", f"{url}/api/generate", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line]
        return response.status_code, response.headers["content-type"], lines


def run_of(fake: FakeOllama, prompt: str, model: str = "llama3:latest") -> dict[str, Any]:
    key = fingerprint(model, prompt)
    return next(run for run in fake.counters.runs_snapshot() if run["fingerprint"] == key)


async def test_garbage_marker_sends_a_non_json_line_mid_stream(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(garbage_marker="SPOIL", garbage_kind="json", garbage_after_tokens=2)
    status, _, lines = await stream_raw(http, server.url, "SPOIL a b c d")
    assert status == 200
    assert [json.loads(line)["response"] for line in lines[:2]] == ["echo: ", "SPOIL "]
    assert lines[2:] == ["garbage: this line is not JSON"]  # and the body ends there
    # A prompt without the marker is answered properly, and only it counts as completed.
    assert json.loads((await stream_raw(http, server.url, "fine"))[2][-1])["done"] is True
    stats = server.fake.stats()
    assert (stats["garbage"], stats["completed"]) == (1, 1)
    spoiled, fine = run_of(server.fake, "SPOIL a b c d"), run_of(server.fake, "fine")
    assert (spoiled["started"], spoiled["completed"], spoiled["garbage"]) == (1, 0, 1)
    assert (fine["started"], fine["completed"], fine["garbage"]) == (1, 1, 0)


async def test_garbage_html_is_a_proxy_502_before_any_generation(start: StartServer) -> None:
    server = await start(garbage_rate=1.0, garbage_kind="html")
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{server.url}/api/generate", json={"model": "llama3", "prompt": "x"}
        )
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "<h1>502 Bad Gateway</h1>" in response.text
    api = ollama.AsyncClient(host=server.url)
    try:
        with pytest.raises(ollama.ResponseError) as failed:
            await api.chat(model="llama3", messages=[{"role": "user", "content": "y"}])
    finally:
        await api.close()
    assert failed.value.status_code == 502
    stats = server.fake.stats()
    assert (stats["garbage"], stats["completed"], stats["started"]) == (2, 0, [])
    assert run_of(server.fake, "x")["started"] == 0 and run_of(server.fake, "x")["garbage"] == 1


async def test_garbage_truncate_ends_the_body_before_done(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(garbage_rate=1.0, garbage_kind="truncate", garbage_after_tokens=1)
    status, _, lines = await stream_raw(http, server.url, "a b c")
    assert status == 200
    assert [json.loads(line) for line in lines] == [
        {**json.loads(lines[0]), "response": "echo: ", "done": False}
    ]
    # Not streamed: a 200 whose JSON body stops half way.
    single = await http.post(
        f"{server.url}/api/generate", json={"model": "llama3", "prompt": "a b", "stream": False}
    )
    assert single.status_code == 200 and single.text.startswith('{"model":"llama3"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(single.text)
    assert server.fake.stats()["garbage"] == 2


async def test_garbage_cut_closes_the_connection_before_done(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(garbage_marker="CUT", garbage_kind="cut", garbage_after_tokens=1)
    with pytest.raises(httpx.TransportError):
        await stream_raw(http, server.url, "CUT a b c")
    stats = await server.fake.wait_until(lambda s: s["active"] == 0)
    assert (stats["garbage"], stats["completed"], stats["disconnects"]) == (1, 0, 0)


async def test_garbage_mixed_takes_each_kind_in_turn(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(garbage_rate=1.0, garbage_after_tokens=0)
    json_kind = await stream_raw(http, server.url, "one")
    html_kind = await stream_raw(http, server.url, "two")
    truncated = await stream_raw(http, server.url, "three")
    with pytest.raises(httpx.TransportError):
        await stream_raw(http, server.url, "four")
    assert json_kind[2] == ["garbage: this line is not JSON"]
    assert html_kind[0] == 502 and html_kind[1].startswith("text/html")
    assert truncated[:3] == (200, "application/x-ndjson", [])
    await server.fake.wait_until(lambda s: s["garbage"] == 4 and s["active"] == 0)
    server.fake.configure(garbage_rate=0.0)
    assert json.loads((await stream_raw(http, server.url, "five"))[2][-1])["done"] is True


async def test_ps_delay_holds_back_only_ps(start: StartServer, http: httpx.AsyncClient) -> None:
    server = await start(ps_delay=30)
    ps = asyncio.create_task(http.get(f"{server.url}/api/ps"))
    await server.fake.wait_until(lambda s: s["slow_ps"] == 1)
    # Everything else answers while /api/ps is held back.
    assert (await http.get(f"{server.url}/api/tags")).status_code == 200
    answer = await http.post(f"{server.url}/api/generate", json={"model": "llama3", "prompt": "x"})
    assert answer.status_code == 200
    assert not ps.done()
    server.fake.configure(ps_delay=0)  # later calls are quick again; the held one still waits
    assert (await http.get(f"{server.url}/api/ps")).status_code == 200
    assert not ps.done()
    ps.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ps
    assert server.fake.stats()["slow_ps"] == 1


async def test_runs_count_starts_and_completions_per_request(
    start: StartServer, http: httpx.AsyncClient
) -> None:
    server = await start(token_rate=20)
    fake = server.fake
    body = {**slow_generate("twice"), "options": {"num_predict": 40}}
    # First generation: the client goes away mid-stream, so it starts but never completes.
    async with http.stream("POST", f"{server.url}/api/generate", json=body) as response:
        async for _ in response.aiter_lines():
            break
    await fake.wait_until(lambda s: s["disconnects"] == 1 and s["active"] == 0)
    fake.configure(token_rate=0)
    await http.post(f"{server.url}/api/generate", json={**body, "stream": False})
    await http.post(f"{server.url}/api/chat", json={"model": "llama3", "messages": [
        {"role": "user", "content": "twice"}
    ]})  # fmt: skip
    runs = (await http.get(f"{server.url}/_fake/runs")).json()["runs"]
    assert len(runs) == 1  # chat and generate of one prompt on one model share a fingerprint
    run = runs[0]
    assert run["fingerprint"] == fingerprint("llama3:latest", "twice")
    assert (run["prompt"], run["model"], run["started"], run["completed"]) == (
        "twice", "llama3:latest", 3, 2
    )  # fmt: skip
    assert len(run["started_at"]) == 3 and len(run["completed_at"]) == 2
    assert run["started_at"][0] <= run["completed_at"][0]
    await http.post(f"{server.url}/_fake/reset")
    assert (await http.get(f"{server.url}/_fake/runs")).json() == {"runs": []}


def test_cli_garbage_and_ps_flags() -> None:
    args = _parser().parse_args(
        ["--garbage-marker", "BAD", "--garbage-rate", "0.25", "--garbage-kind", "cut",
         "--garbage-after-tokens", "3", "--ps-delay", "9"]
    )  # fmt: skip
    config = _config_from_args(args)
    assert (config.garbage_marker, config.garbage_rate, config.garbage_kind) == ("BAD", 0.25, "cut")
    assert (config.garbage_after_tokens, config.ps_delay) == (3, 9.0)
    with pytest.raises(ValueError, match="garbage_kind"):
        _config_from_args(_parser().parse_args(["--garbage-kind", "nonsense"]))
    with pytest.raises(ValueError, match="ps_delay"):
        _config_from_args(_parser().parse_args(["--ps-delay", "-1"]))


# -- control surface ---------------------------------------------------------------------------


async def test_control_endpoints(server: FakeOllamaServer, http: httpx.AsyncClient) -> None:
    await http.post(f"{server.url}/api/generate", json={"model": "llama3", "prompt": "x"})
    stats = (await http.get(f"{server.url}/_fake/stats")).json()
    assert stats["completed"] == 1 and stats["started"][0]["prompt"] == "x"
    assert set(stats["started"][0]) >= {"id", "model", "prompt", "t"}
    changed = await http.post(f"{server.url}/_fake/config", json={"fail_next": 1, "token_rate": 5})
    assert changed.json()["fail_next"] == 1 and server.fake.config.token_rate == 5
    bad = await http.post(f"{server.url}/_fake/config", json={"no_such_knob": 1})
    assert bad.status_code == 400
    assert (await http.post(f"{server.url}/_fake/reset")).status_code == 200
    after = server.fake.stats()
    assert (after["completed"], after["started"], after["requests"]) == (0, [], {})


async def test_model_names_normalise(start: StartServer) -> None:
    server = await start(models=["llama3", "Qwen2:0.5B"])
    api = ollama.AsyncClient(host=server.url)
    try:
        assert [m.model for m in (await api.list()).models] == ["llama3:latest", "qwen2:0.5b"]
        assert (await api.generate(model="llama3:latest", prompt="x")).model == "llama3:latest"
        assert (await api.generate(model="qwen2:0.5b", prompt="x")).response == "echo: x"
    finally:
        await api.close()
    assert server.fake.stats()["models"]["llama3:latest"]["completed"] == 1


async def test_cli_serves_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.tooling.fake_ollama",
        "--port",
        "0",
        "--models",
        "tiny:1b",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "OLLAMA_NUM_PARALLEL": "3"},
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(20):
            banner = (await process.stdout.readline()).decode()
        url = banner.rsplit(" ", 1)[-1].strip()
        async with httpx.AsyncClient() as http:
            tags = (await http.get(f"{url}/api/tags")).json()
            config = (await http.get(f"{url}/_fake/config")).json()
        assert [m["name"] for m in tags["models"]] == ["tiny:1b"]
        assert config["num_parallel"] == 3
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            code = await process.wait()
    assert code == 0
