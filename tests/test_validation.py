"""Bad input gets a clear, Ollama-shaped error and nothing is enqueued."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from jsonschema import Draft202012Validator
from redis.asyncio import Redis
from starlette.routing import Route

from corral.gateway.routes import jobs, ollama, openai, status
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import record_requests

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
        ("/api/generate", b'{"model": 3}', 400, "invalid 'model': expected a string"),
        ("/api/generate", b'{"model": "llama3", "prompt": 5}', 400, "invalid 'prompt'"),
        ("/api/generate", b'{"model": "llama3", "stream": "yes"}', 400, "invalid 'stream'"),
        ("/api/generate", b'{"model": "llama3", "options": []}', 400, "invalid 'options'"),
        ("/api/chat", b'{"model": "llama3", "messages": {}}', 400, "invalid 'messages'"),
        (
            "/api/chat",
            b'{"model": "llama3", "messages": [{"content": "x"}]}',
            400,
            "messages[0].role is required",
        ),
        ("/api/chat", b'{"model": "llama3", "messages": [3]}', 400, "invalid 'messages[0]'"),
        ("/api/embed", b'{"model": "nomic-embed-text", "input": [1]}', 400, "invalid 'input[0]'"),
        ("/api/embeddings", b'{"model": "nomic-embed-text", "prompt": []}', 400, "'prompt'"),
        ("/api/show", b"{}", 400, "model is required"),
        ("/jobs", b'{"kind": "dance", "request": {}}', 400, "invalid 'kind': expected one of"),
        (
            "/jobs",
            b'{"kind": "chat", "request": "x"}',
            400,
            "invalid 'request': expected an object",
        ),
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


# Known options with the wrong type are refused by every node (Ollama answers 500 for them
# after loading the model): the gateway refuses them first, with the field and its type.
WRONG_OPTIONS = [
    ({"num_predict": "lots"}, "invalid 'options.num_predict': expected a number, got a string"),
    ({"temperature": "hot"}, "invalid 'options.temperature': expected a number, got a string"),
    ({"stop": 5}, "invalid 'options.stop': expected an array, got an integer"),
    ({"stop": ["ok", 5]}, "invalid 'options.stop[1]': expected a string, got an integer"),
    ({"use_mmap": 1}, "invalid 'options.use_mmap': expected a boolean, got an integer"),
]
OLLAMA_BODIES = {
    "/api/generate": {"model": "llama3", "prompt": "hi"},
    "/api/chat": {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]},
    "/api/embed": {"model": "nomic-embed-text", "input": "hi"},
    "/api/embeddings": {"model": "nomic-embed-text", "prompt": "hi"},
}


@pytest.mark.parametrize("path", sorted(OLLAMA_BODIES))
@pytest.mark.parametrize(("options", "error"), WRONG_OPTIONS)
async def test_wrong_option_types_are_400(
    http: httpx.AsyncClient, redis: Redis, path: str, options: dict[str, object], error: str
) -> None:
    response = await http.post(path, json={**OLLAMA_BODIES[path], "options": options})
    assert response.status_code == 400
    assert response.json() == {"error": error}
    await _nothing_enqueued(redis)


@pytest.mark.parametrize(("options", "error"), WRONG_OPTIONS)
async def test_wrong_option_types_inside_a_job_are_400(
    http: httpx.AsyncClient, redis: Redis, options: dict[str, object], error: str
) -> None:
    inner = {**OLLAMA_BODIES["/api/generate"], "options": options}
    response = await http.post("/jobs", json={"kind": "generate", "request": inner})
    assert response.status_code == 400
    assert response.json() == {"error": error.replace("'options.", "'request.options.")}
    await _nothing_enqueued(redis)


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        (
            "/api/chat",
            {"model": "llama3", "messages": [{"role": "user", "content": 5}]},
            "invalid 'messages[0].content': expected a string, got an integer",
        ),
        (
            "/api/chat",
            {"model": "llama3", "messages": [{"role": "user", "content": "x", "images": "aGk="}]},
            "invalid 'messages[0].images': expected an array, got a string",
        ),
        (
            "/api/chat",
            {"model": "llama3", "messages": [{"role": "user", "tool_calls": [{"function": {}}]}]},
            "messages[0].tool_calls[0].function.name is required",
        ),
        (
            "/api/generate",
            {"model": "llama3", "prompt": "x", "images": ["aGk=", 7]},
            "invalid 'images[1]': expected a string, got an integer",
        ),
        (
            "/api/generate",
            {"model": "llama3", "context": [1, "two"]},
            "invalid 'context[1]': expected an integer, got a string",
        ),
        (
            "/api/generate",
            {"model": "llama3", "keep_alive": True},
            "invalid 'keep_alive': expected a number or a string, got a boolean",
        ),
        (
            "/api/embed",
            {"model": "nomic-embed-text", "input": "x", "dimensions": 1.5},
            "invalid 'dimensions': expected an integer, got a float",
        ),
        ("/api/show", {"model": 3}, "invalid 'model': expected a string, got an integer"),
        (
            "/jobs",
            {"kind": "chat", "request": {"model": "llama3", "messages": [{"role": 1}]}},
            "invalid 'request.messages[0].role': expected a string, got an integer",
        ),
        ("/jobs", {"kind": "chat", "request": {}}, "request.model is required"),
        (
            "/jobs",
            {"kind": "chat", "request": {"model": "llama3"}, "timeout": 0},
            "invalid 'timeout': expected a number > 0.0",
        ),
    ],
)
async def test_nested_wrong_types_name_the_field(
    http: httpx.AsyncClient, redis: Redis, path: str, body: dict[str, object], error: str
) -> None:
    response = await http.post(path, json=body)
    assert response.status_code == 400
    assert response.json() == {"error": error}
    await _nothing_enqueued(redis)


async def test_valid_bodies_reach_the_node_as_sent(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation never reshapes: fields and options Corral does not know, and numbers in
    the form Ollama accepts (4096.0 for an integer option), are forwarded untouched."""
    raw = (
        b'{"model": "llama3", "prompt": "hi", "stream": false, "x_client": {"trace": [1, 2.5]},'
        b' "options": {"num_ctx": 4096.0, "num_predict": 3, "mystery_option": "kept",'
        b' "temperature": 0, "stop": null}, "keep_alive": "5m", "format": "", "shift": true}'
    )
    sent = record_requests(monkeypatch)
    response = await http.post("/api/generate", content=raw)
    assert response.status_code == 200, response.text
    forwarded = sent[response.headers["x-corral-job-id"]]
    # What the gateway has always sent: the body as parsed, with the model's full name and
    # ``stream: true`` (workers always stream from Ollama).
    expected = orjson.loads(raw) | {"model": "llama3:latest", "stream": True}
    assert forwarded == orjson.dumps(expected)
    assert b'"num_ctx":4096.0' in forwarded and b'"mystery_option":"kept"' in forwarded


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


# --- the published schema ---


def _body_routes() -> list[str]:
    """Every path that takes a JSON body (model management is refused without reading one)."""
    routes = [*ollama.ROUTES, *openai.ROUTES, *jobs.ROUTES, *status.ROUTES]
    return [
        route.path
        for route in routes
        if isinstance(route, Route)
        and "POST" in (route.methods or ())
        and getattr(route.endpoint, "__wrapped__", route.endpoint) is not ollama.management
    ]


def _validator(document: dict[str, Any], path: str) -> Draft202012Validator:
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return Draft202012Validator({**schema["schema"], "components": document["components"]})


async def test_openapi_document_has_every_body(http: httpx.AsyncClient) -> None:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = orjson.loads(response.content)
    assert document["openapi"].startswith("3.1")
    assert document["info"]["title"] == "Corral"
    components = document["components"]["schemas"]
    for schema in components.values():
        Draft202012Validator.check_schema(schema)
    paths = _body_routes()
    assert len(paths) == 9 and set(paths) <= set(document["paths"])
    for path in paths:
        body = document["paths"][path]["post"]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref.removeprefix("#/components/schemas/") in components, path
    options = components["Options"]["properties"]
    assert {"num_ctx", "num_predict", "temperature", "top_k", "top_p", "min_p", "seed"} <= set(
        options
    )
    assert options["stop"]["anyOf"][0] == {"type": "array", "items": {"type": "string"}}
    assert components["JobSubmission"]["required"] == ["kind", "request"]


async def test_the_schema_agrees_with_the_gateway(http: httpx.AsyncClient) -> None:
    """What the gateway accepts the schema accepts, and a wrong type fails both: a client
    or a fuzzer that trusts the document is answered as it expects."""
    document = orjson.loads((await http.get("/openapi.json")).content)
    rich = {
        "/api/generate": {
            **OLLAMA_BODIES["/api/generate"],
            "options": {"num_ctx": 4096.0, "stop": ["\n"], "temperature": 0, "mystery": [1]},
            "format": {"type": "object"},
            "keep_alive": 300,
            "think": "high",
            "images": ["aGk="],
            "x_unknown": True,
        },
        "/api/chat": {**OLLAMA_BODIES["/api/chat"], "tools": [{"type": "function"}]},
        "/api/embed": {**OLLAMA_BODIES["/api/embed"], "input": ["a", "b"], "truncate": False},
        "/api/embeddings": OLLAMA_BODIES["/api/embeddings"],
        "/jobs": {"kind": "embed", "request": OLLAMA_BODIES["/api/embed"], "priority": 0},
    }
    for path, body in rich.items():
        assert not list(_validator(document, path).iter_errors(body)), path
        response = await http.post(path, json={**body, "stream": False})
        assert response.status_code == 200, (path, response.text)
    for options, _ in WRONG_OPTIONS:
        for path, valid in OLLAMA_BODIES.items():
            body = {**valid, "options": options}
            assert not _validator(document, path).is_valid(body), (path, options)
    refused = {"kind": "generate", "request": {"model": "llama3"}, "timeout": 0}
    assert not _validator(document, "/jobs").is_valid(refused)
