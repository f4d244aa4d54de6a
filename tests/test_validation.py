"""Bad input gets a clear, Ollama-shaped error and nothing is enqueued."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from redis.asyncio import Redis

from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig

LIMIT = 4096


@pytest.fixture
async def http(
    start_cluster: Callable[..., Awaitable[LocalCluster]],
) -> AsyncIterator[httpx.AsyncClient]:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"max_body_bytes": LIMIT})
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        yield client


async def _nothing_enqueued(redis: Redis) -> None:
    assert await redis.hget("corral:stats", "enqueued") is None
    assert await redis.keys("corral:job:*") == []


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/generate", b'{"model": "llama3", "prompt": ', 400, "invalid JSON in request body"),
        ("/api/chat", b"", 400, "missing request body"),
        ("/api/generate", b'["llama3"]', 400, "request body must be a JSON object"),
        ("/api/generate", b'{"prompt": "hi"}', 400, "model is required"),
        ("/api/chat", b'{"model": "", "messages": []}', 400, "model is required"),
        ("/api/generate", b'{"model": 3}', 400, "model must be a string"),
        ("/api/generate", b'{"model": "llama3", "prompt": 5}', 400, "invalid 'prompt'"),
        ("/api/generate", b'{"model": "llama3", "stream": "yes"}', 400, "invalid 'stream'"),
        ("/api/generate", b'{"model": "llama3", "options": []}', 400, "invalid 'options'"),
        ("/api/chat", b'{"model": "llama3", "messages": {}}', 400, "invalid 'messages'"),
        ("/api/chat", b'{"model": "llama3", "messages": [{"content": "x"}]}', 400, "'role'"),
        ("/api/chat", b'{"model": "llama3", "messages": [3]}', 400, "invalid message 0"),
        ("/api/embed", b'{"model": "nomic-embed-text", "input": [1]}', 400, "invalid 'input'"),
        ("/api/embeddings", b'{"model": "nomic-embed-text", "prompt": []}', 400, "'prompt'"),
        ("/api/show", b"{}", 400, "model is required"),
        ("/jobs", b'{"kind": "dance", "request": {}}', 400, "'kind' must be one of"),
        ("/jobs", b'{"kind": "chat", "request": "x"}', 400, "'request' must be"),
        (
            "/jobs",
            b'{"kind": "chat", "request": {"model": "llama3"}, "priority": 12}',
            400,
            "'priority'",
        ),
        ("/jobs", b'{"kind": "chat", "request": {"model": "llama3"}, "wait": 1}', 400, "'wait'"),
        ("/api/generate", b'{"model": "ghost", "prompt": "x"}', 404, 'model "ghost" not found'),
    ],
)
async def test_malformed_requests(
    http: httpx.AsyncClient, redis: Redis, path: str, body: bytes, status: int, error: str
) -> None:
    response = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"error"} and error in payload["error"]
    await _nothing_enqueued(redis)


async def test_oversized_body_is_refused_before_it_is_read(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    big = {"model": "llama3", "prompt": "x" * LIMIT}
    response = await http.post("/api/generate", json=big)
    assert response.status_code == 413
    assert "request body too large" in response.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit still holds
        yield b'{"model": "llama3", "prompt": "'
        for _ in range(10):
            yield b"y" * 1024
        yield b'"}'

    chunked = await http.post("/api/generate", content=chunks())
    assert chunked.status_code == 413
    await _nothing_enqueued(redis)


@pytest.mark.parametrize("value", ["high", "10", "-1", "1.5", ""])
async def test_bad_priority_header(http: httpx.AsyncClient, redis: Redis, value: str) -> None:
    response = await http.post(
        "/api/generate",
        json={"model": "llama3", "prompt": "hi"},
        headers={"X-Corral-Priority": value},
    )
    assert response.status_code == 400
    assert "X-Corral-Priority" in response.json()["error"]
    await _nothing_enqueued(redis)


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
async def test_bad_timeout_header(http: httpx.AsyncClient, redis: Redis, value: str) -> None:
    response = await http.post(
        "/api/generate",
        json={"model": "llama3", "prompt": "hi"},
        headers={"X-Corral-Timeout": value},
    )
    assert response.status_code == 400
    assert "X-Corral-Timeout" in response.json()["error"]
    await _nothing_enqueued(redis)


async def test_api_keys_are_enforced(
    start_cluster: Callable[..., Awaitable[LocalCluster]], redis: Redis
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"api_keys": "s3cret:1,other"})
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        body = {"model": "llama3", "prompt": "hi", "stream": False}
        refused = await client.post("/api/generate", json=body)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        wrong = await client.post("/api/generate", json=body, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401
        await _nothing_enqueued(redis)
        ok = await client.post(
            "/api/generate", json=body, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200 and ok.json()["response"] == "echo: hi"
        job = await client.get(
            f"/jobs/{ok.headers['x-corral-job-id']}", headers={"Authorization": "Bearer s3cret"}
        )
        assert job.json()["priority"] == 1  # the key's own default priority


async def test_queue_full_is_503_with_retry_after(
    start_cluster: Callable[..., Awaitable[LocalCluster]],
) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=1, token_rate=50)], gateway={"max_queue": 2}
    )
    fake = cluster.nodes[0].fake.fake
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        slow = {
            "kind": "generate",
            "wait": False,
            "request": {"model": "llama3", "prompt": "x", "options": {"num_predict": 50}},
        }
        assert (await client.post("/jobs", json=slow)).status_code == 202
        await fake.wait_until(lambda s: s["active"] == 1)
        for _ in range(2):
            assert (await client.post("/jobs", json=slow)).status_code == 202
        full = await client.post("/api/generate", json={"model": "llama3", "prompt": "x"})
        assert full.status_code == 503
        assert full.headers["retry-after"] == "1"
        assert "server busy" in full.json()["error"]


async def test_routing_wrong_methods_and_unknown_paths(http: httpx.AsyncClient) -> None:
    """The indexed fast path must answer exactly as Starlette's own routing would."""
    assert (await http.head("/")).status_code == 200
    assert (await http.get("/")).text == "Ollama is running"
    assert (await http.get("/api/generate")).status_code == 405
    assert (await http.delete("/api/tags")).status_code == 405
    assert (await http.get("/api/nothing-here")).status_code == 404
    missing = await http.get("/jobs/0123456789abcdef")
    assert missing.status_code == 404 and "error" in missing.json()
    assert (await http.post("/api/pull", json={"model": "x"})).status_code == 403
