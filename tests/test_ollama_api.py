"""The official ``ollama`` client, pointed at the gateway, works as it does against Ollama."""

from __future__ import annotations

from collections.abc import AsyncIterator

import ollama
import pytest

from corral.tooling.cluster import LocalCluster


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=cluster.url) as client:
        yield client


async def test_generate_non_streaming(client: ollama.AsyncClient) -> None:
    reply = await client.generate(model="llama3", prompt="hello corral", stream=False)
    assert isinstance(reply, ollama.GenerateResponse)
    assert reply.response == "echo: hello corral"
    assert reply.done and reply.done_reason == "stop"
    assert reply.model == "llama3:latest"
    assert reply.eval_count == 3 and reply.total_duration


async def test_generate_streaming(client: ollama.AsyncClient) -> None:
    stream = await client.generate(model="llama3", prompt="one two three", stream=True)
    parts = [p async for p in stream]
    assert all(isinstance(p, ollama.GenerateResponse) for p in parts)
    assert "".join(p.response for p in parts) == "echo: one two three"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == 4


async def test_chat_non_streaming_and_streaming(client: ollama.AsyncClient) -> None:
    messages = [{"role": "user", "content": "how are you"}]
    reply = await client.chat(model="llama3", messages=messages)
    assert isinstance(reply, ollama.ChatResponse)
    assert reply.message.role == "assistant"
    assert reply.message.content == "echo: how are you"
    parts = [p async for p in await client.chat(model="llama3", messages=messages, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == "echo: how are you"
    assert parts[-1].done and parts[-1].done_reason == "stop"


async def test_chat_tool_calls_pass_through(client: ollama.AsyncClient) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "look something up",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
    reply = await client.chat(
        model="llama3", messages=[{"role": "user", "content": "weather"}], tools=[tool]
    )
    assert reply.message.tool_calls is not None
    call = reply.message.tool_calls[0]
    assert call.function.name == "lookup"
    assert call.function.arguments == {"query": "weather"}


async def test_embed_single_and_list(client: ollama.AsyncClient) -> None:
    one = await client.embed(model="nomic-embed-text", input="alpha")
    assert isinstance(one, ollama.EmbedResponse)
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 16
    many = await client.embed(model="nomic-embed-text", input=["alpha", "beta"])
    assert len(many.embeddings) == 2
    assert many.embeddings[0] == one.embeddings[0]  # deterministic per text
    legacy = await client.embeddings(model="nomic-embed-text", prompt="alpha")
    assert isinstance(legacy, ollama.EmbeddingsResponse) and len(legacy.embedding) == 16


async def test_list_ps_show(client: ollama.AsyncClient) -> None:
    listed = await client.list()
    assert isinstance(listed, ollama.ListResponse)
    names = {m.model for m in listed.models}
    assert names == {"llama3:latest", "qwen2:0.5b", "nomic-embed-text:latest"}
    await client.generate(model="qwen2:0.5b", prompt="load me")
    running = await client.ps()
    assert isinstance(running, ollama.ProcessResponse)
    shown = await client.show("llama3")
    assert isinstance(shown, ollama.ShowResponse)
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.capabilities is not None and "completion" in shown.capabilities


async def test_ps_reports_models_loaded_across_nodes(
    client: ollama.AsyncClient, cluster: LocalCluster
) -> None:
    await client.generate(model="qwen2:0.5b", prompt="load me")
    node = cluster.nodes[0]
    await node.worker.refresh_loaded()  # read the new /api/ps now rather than next period
    await node.worker.heartbeat()  # and publish it
    await cluster.gateway.state.fleet.refresh()  # type: ignore[union-attr]
    running = await client.ps()
    assert "qwen2:0.5b" in {m.model for m in running.models}


async def test_errors_keep_ollama_status_codes(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        await client.generate(model="no-such-model", prompt="x")
    assert missing.value.status_code == 404
    assert missing.value.error == 'model "no-such-model" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as streaming:
        async for _ in await client.chat(model="nope", messages=[], stream=True):
            pass
    assert streaming.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as embed_only:
        await client.generate(model="nomic-embed-text", prompt="x")
    assert embed_only.value.status_code == 400
    assert "does not support generate" in embed_only.value.error
    with pytest.raises(ollama.ResponseError) as show_missing:
        await client.show("nope")
    assert show_missing.value.status_code == 404


async def test_model_management_is_refused_not_passed_through(
    client: ollama.AsyncClient, cluster: LocalCluster
) -> None:
    with pytest.raises(ollama.ResponseError) as pull:
        await client.pull("llama3", stream=False)
    assert pull.value.status_code == 403
    with pytest.raises(ollama.ResponseError) as delete:
        await client.delete("llama3")
    assert delete.value.status_code == 403
    assert cluster.nodes[0].fake.fake.stats()["requests"].get("/api/pull") is None


async def test_root_and_version(cluster: LocalCluster) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=cluster.url) as http:
        root = await http.get("/")
        assert root.text == "Ollama is running"
        version = (await http.get("/api/version")).json()
        assert version["version"]
