"""Tenants: keys, classes, scopes, ownership, ceilings, rate limits, quotas, audit, CORS."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from corral import apikeys, keys
from corral.errors import ConfigError
from corral.gateway.app import create_app
from corral.gateway.auth import ScopedMount, ScopedRoute, unscoped
from corral.gateway.routes import jobs, ollama, openai, status
from corral.settings import GatewaySettings, SchedulerSettings
from corral.tenants import Scope
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import held_bytes, until

StartCluster = Callable[..., Awaitable[LocalCluster]]
GENERATE = {"model": "llama3", "prompt": "hi", "stream": False}


def keycli(redis_url: str, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert apikeys.main(["--redis-url", redis_url, *args]) == 0
    return capsys.readouterr().out


def add_key(redis_url: str, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """A new key's secret, as ``corral keys add`` prints it once."""
    out = keycli(redis_url, capsys, "add", *args)
    return next(line.split()[1] for line in out.splitlines() if line.startswith("key:"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- scopes, deny by default ---


def test_every_route_declares_a_scope() -> None:
    routes = [*ollama.ROUTES, *openai.ROUTES, *jobs.ROUTES, *status.ROUTES]
    assert routes and all(isinstance(r, ScopedRoute) for r in routes)
    assert unscoped(routes) == []

    async def endpoint(request: Any) -> Any:
        raise AssertionError

    assert unscoped([*routes, Route("/new", endpoint)]) == ["/new"]
    create_app(GatewaySettings())  # the app builds only when every route has one


async def test_scopes_and_ownership(
    start_cluster: StartCluster, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"auth_cache_ttl": 0})
    alice = add_key(redis_url, capsys, "--id", "alice")
    bob = add_key(redis_url, capsys, "--id", "bob")
    scraper = add_key(redis_url, capsys, "--id", "prom", "--scopes", "metrics")
    admin = add_key(redis_url, capsys, "--id", "root", "--scopes", "admin")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        job = {"kind": "generate", "wait": False, "request": GENERATE}
        submitted = await client.post("/jobs", json=job, headers=bearer(alice))
        assert submitted.status_code == 202
        job_id = submitted.json()["id"]
        await cluster_done(client, job_id, alice)
        mine = await client.get(f"/jobs/{job_id}", headers=bearer(alice))
        assert mine.status_code == 200 and mine.json()["owner"] == "alice"
        # Another key's job is as unknown as a missing one, to read and to cancel.
        assert (await client.get(f"/jobs/{job_id}", headers=bearer(bob))).status_code == 404
        assert (await client.delete(f"/jobs/{job_id}", headers=bearer(bob))).status_code == 404
        assert (await client.get(f"/jobs/{job_id}", headers=bearer(admin))).status_code == 200
        # /nodes and /status are admin only; /metrics needs the metrics scope.
        for path in ("/nodes", "/status"):
            refused = await client.get(path, headers=bearer(alice))
            assert refused.status_code == 403 and "admin" in refused.json()["error"]
            assert (await client.get(path, headers=bearer(admin))).status_code == 200
        assert (await client.get("/metrics", headers=bearer(alice))).status_code == 403
        assert (await client.get("/metrics", headers=bearer(scraper))).status_code == 200
        assert (
            await client.post("/api/generate", json=GENERATE, headers=bearer(scraper))
        ).status_code == 403
        # Public routes need nothing; the rest answer 401 with a challenge.
        assert (await client.get("/healthz")).status_code == 200
        missing = await client.get("/api/tags")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await client.get("/v1/models", headers=bearer("nope"))
        assert wrong.status_code == 401 and "invalid_token" in wrong.headers["www-authenticate"]
        assert wrong.json()["error"]["type"] == "authentication_error"  # OpenAI's shape on /v1
        # Revoked (cache TTL 0 here): refused at once.
        keycli(redis_url, capsys, "revoke", "bob")
        assert (await client.get("/api/tags", headers=bearer(bob))).status_code == 401


async def test_a_mounted_app_behind_the_admin_scope(
    start_cluster: StartCluster, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a dashboard mounted on the gateway uses: ``ScopedMount`` (``ScopeGate``)."""
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"auth_cache_ttl": 0})
    assert cluster.gateway is not None
    dashboard = PlainTextResponse("dashboard")
    mount = ScopedMount("/dash", dashboard, scope=Scope.ADMIN)
    assert unscoped([mount]) == []
    cluster.gateway.app.app.router.routes.append(mount)
    user = add_key(redis_url, capsys, "--id", "user")
    admin = add_key(redis_url, capsys, "--id", "root", "--scopes", "admin")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        missing = await client.get("/dash/")
        assert missing.status_code == 401 and "www-authenticate" in missing.headers
        assert (await client.get("/dash/", headers=bearer(user))).status_code == 403
        shown = await client.get("/dash/", headers=bearer(admin))
        assert shown.status_code == 200 and shown.text == "dashboard"


async def cluster_done(client: httpx.AsyncClient, job_id: str, token: str) -> None:
    async with asyncio.timeout(15):
        while True:
            view = (await client.get(f"/jobs/{job_id}", headers=bearer(token))).json()
            if view["state"] == "done":
                return
            await asyncio.sleep(0.02)


async def test_failed_authentication_is_throttled_per_address(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(
        [FakeOllamaConfig()], gateway={"api_keys": "good-key", "auth_fail_limit": 3}
    )
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        for _ in range(3):
            assert (await client.get("/api/tags", headers=bearer("guess"))).status_code == 401
        throttled = await client.get("/api/tags", headers=bearer("good-key"))
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1


async def test_open_gateway_warns_at_start(
    start_cluster: StartCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()])
    assert any("no API keys are configured" in r.message for r in caplog.records)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        assert (await client.post("/api/generate", json=GENERATE)).status_code == 200
        assert (await client.get("/nodes")).status_code == 200


# --- classes: priority ceiling, models, num_predict ---


async def test_class_ceilings(
    start_cluster: StartCluster,
    redis_url: str,
    redis: Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"auth_cache_ttl": 0})
    keycli(redis_url, capsys, "class", "opus", "--priority-ceiling", "3",
           "--models", "llama3", "--num-predict-max", "40")  # fmt: skip
    token = add_key(redis_url, capsys, "--id", "agent", "--class", "opus", "--priority", "1")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        urgent = {"X-Corral-Priority": "0", **bearer(token)}
        ok = await client.post("/api/generate", json=GENERATE, headers=urgent)
        assert ok.status_code == 200
        view = (
            await client.get(f"/jobs/{ok.headers['x-corral-job-id']}", headers=bearer(token))
        ).json()
        assert view["priority"] == 3 and view["priority_asked"] == 0  # clamped, and shown
        # The key's own default (1) is clamped too.
        ok = await client.post("/api/generate", json=GENERATE, headers=bearer(token))
        view = (
            await client.get(f"/jobs/{ok.headers['x-corral-job-id']}", headers=bearer(token))
        ).json()
        assert (view["priority"], view["priority_asked"]) == (3, 1)
        # num_predict: -1 (no end) and too many are clamped to the ceiling; fewer are kept.
        for asked, kept in ((-1, 40), (5000, 40), (None, 40), (7, 7)):
            options = {} if asked is None else {"num_predict": asked}
            job = {"kind": "generate", "wait": False, "request": {**GENERATE, "options": options}}
            submitted = await client.post("/jobs", json=job, headers=bearer(token))
            assert submitted.status_code == 202
            stored = await redis.hget(keys.job(submitted.json()["id"]), "req")
            assert orjson.loads(stored)["options"]["num_predict"] == kept
        other = await client.post(
            "/v1/chat/completions",
            json={"model": "mistral", "messages": [{"role": "user", "content": "hi"}]},
            headers=bearer(token),
        )
        assert other.status_code == 403 and "not allowed" in other.json()["error"]["message"]


# --- rate limits ---


async def test_request_and_token_rate_limits(
    start_cluster: StartCluster, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"auth_cache_ttl": 0})
    keycli(redis_url, capsys, "class", "sonnet", "--key-rpm", "3")
    keycli(redis_url, capsys, "class", "haiku", "--key-tpm", "100")
    first = add_key(redis_url, capsys, "--class", "sonnet")
    second = add_key(redis_url, capsys, "--class", "sonnet")
    tokens = add_key(redis_url, capsys, "--class", "haiku")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        remaining = []
        for _ in range(3):
            ok = await client.post("/api/generate", json=GENERATE, headers=bearer(first))
            assert ok.status_code == 200
            assert ok.headers["ratelimit-policy"] == "3;w=60"
            remaining.append(int(ok.headers["ratelimit-remaining"]))
        assert remaining == [2, 1, 0]
        over = await client.post("/api/generate", json=GENERATE, headers=bearer(first))
        assert over.status_code == 429
        assert 1 <= int(over.headers["retry-after"]) <= 60
        assert over.headers["ratelimit-remaining"] == "0"
        # The limit is per key: another key of the class is still served.
        assert (
            await client.post("/api/generate", json=GENERATE, headers=bearer(second))
        ).status_code == 200
        # Tokens: charged as num_predict at admission.
        ask = {**GENERATE, "options": {"num_predict": 60}}
        assert (
            await client.post("/api/generate", json=ask, headers=bearer(tokens))
        ).status_code == 200
        assert (
            await client.post("/api/generate", json=ask, headers=bearer(tokens))
        ).status_code == 429
        huge = {**GENERATE, "options": {"num_predict": 500}}
        never = await client.post("/api/generate", json=huge, headers=bearer(tokens))
        assert never.status_code == 429 and "exceed" in never.json()["error"]


@pytest.mark.parametrize("stream", [False, True])
async def test_token_charge_is_settled_to_what_was_generated(
    start_cluster: StartCluster,
    redis_url: str,
    redis: Redis,
    capsys: pytest.CaptureFixture[str],
    stream: bool,
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"auth_cache_ttl": 0})
    keycli(redis_url, capsys, "class", "haiku", "--key-tpm", "100", "--class-tpm", "1000")
    token = add_key(redis_url, capsys, "--id", "agent", "--class", "haiku")
    # A JSON answer ends on its own, before num_predict (the fake cannot cycle JSON).
    ask = {**GENERATE, "stream": stream, "format": "json", "options": {"num_predict": 80}}
    total = keys.rate_sum("key", "agent", "tok")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        first = await client.post("/api/generate", json=ask, headers=bearer(token))
        assert first.status_code == 200
        final = orjson.loads(first.text.strip().splitlines()[-1])
        used = final["eval_count"]
        assert 0 < used < 80

        async def charged() -> int:
            return int(await redis.get(total) or 0)

        await until(charged, used)  # settled once the answer was out
        assert int(await redis.get(keys.rate_sum("class", "haiku", "tok"))) == used
        # Without the settlement, 80 + 80 would not fit in 100.
        second = await client.post("/api/generate", json=ask, headers=bearer(token))
        assert second.status_code == 200


async def test_rate_limit_fails_closed_when_redis_refuses_writes(
    start_cluster: StartCluster,
    redis_url: str,
    redis: Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Redis out of memory: a limited key's request is a 503, never let through uncounted."""
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"auth_cache_ttl": 0})
    keycli(redis_url, capsys, "class", "sonnet", "--key-rpm", "20")
    token = add_key(redis_url, capsys, "--id", "agent", "--class", "sonnet")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", "1")
        try:
            refused = await client.post("/api/generate", json=GENERATE, headers=bearer(token))
        finally:
            await redis.config_set("maxmemory", "0")
        assert refused.status_code == 503 and "unavailable" in refused.json()["error"]
        assert await redis.zcard(keys.rate_log("key", "agent", "req")) == 0
        served = await client.post("/api/generate", json=GENERATE, headers=bearer(token))
        assert served.status_code == 200 and served.headers["ratelimit-remaining"] == "19"


async def test_ten_gateway_processes_keep_one_limit_exact(
    start_cluster: StartCluster,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Ten ``corral gateway`` processes sharing one Redis admit 20 of 60 requests a minute."""
    await start_cluster([FakeOllamaConfig(num_parallel=8)], gateway=None)
    keycli(redis_url, capsys, "class", "sonnet", "--key-rpm", "20")
    token = add_key(redis_url, capsys, "--class", "sonnet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_REDIS_URL"] = redis_url
    procs: list[subprocess.Popen[bytes]] = []
    ports = [_free_port() for _ in range(10)]
    try:
        for port in ports:
            argv = [sys.executable, "-m", "corral.cli", "gateway", "--port", str(port)]
            with (tmp_path / f"gw{port}.log").open("wb") as log:  # the child keeps its copy
                procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        async with httpx.AsyncClient(timeout=30) as client:
            async with asyncio.timeout(120):
                for port in ports:
                    while True:
                        try:
                            if (
                                await client.get(f"http://127.0.0.1:{port}/healthz")
                            ).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await asyncio.sleep(0.1)
            sent = [
                client.post(
                    f"http://127.0.0.1:{ports[i % 10]}/api/generate",
                    json=GENERATE,
                    headers=bearer(token),
                )
                for i in range(60)
            ]
            answers = await asyncio.gather(*sent)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 20 and codes.count(429) == 40, codes
    served_by = {ports[i % 10] for i, a in enumerate(answers) if a.status_code == 200}
    assert len(served_by) > 1  # the limit held across processes, not within one


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- stored bytes ---


async def test_stored_bytes_quota_refuses_one_key_and_serves_another(
    start_cluster: StartCluster,
    redis_url: str,
    redis: Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # No node serves the jobs' model slots fast enough: one slot, slow tokens.
    cluster = await start_cluster(
        [FakeOllamaConfig(num_parallel=1, token_rate=5)], gateway={"auth_cache_ttl": 0}
    )
    keycli(redis_url, capsys, "class", "batch", "--quota-bytes", "20000")
    flooder = add_key(redis_url, capsys, "--id", "flooder", "--class", "batch")
    polite = add_key(redis_url, capsys, "--id", "polite", "--class", "batch")
    big = {"model": "llama3", "prompt": "x" * 6000, "options": {"num_predict": 50}}
    job = {"kind": "generate", "wait": False, "request": big}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        codes = [
            (await client.post("/jobs", json=job, headers=bearer(flooder))).status_code
            for _ in range(5)
        ]
        assert codes == [202, 202, 202, 429, 429]
        served = await client.post("/jobs", json=job, headers=bearer(polite))
        assert served.status_code == 202
        # Cancelling one gives its bytes back.
        cancelled = await client.delete(f"/jobs/{served.json()['id']}", headers=bearer(polite))
        assert cancelled.status_code == 200
        assert await held_bytes(redis, "polite") == 0
        assert await held_bytes(redis, "flooder") > 0


# --- secrets ---


def test_keys_are_never_printed_nor_flags(tmp_path: Path) -> None:
    secret = "crl_very-secret-value"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(
        CORRAL_API_KEYS=f"{secret}:1,changeme,{secret}2:x",
        CORRAL_PORT="not-a-port",
        CORRAL_REDIS_URL="redis://:hunter2@127.0.0.1:1/0",
    )
    run = subprocess.run(  # noqa: PLW1510 - the exit status is asserted
        [sys.executable, "-m", "corral.cli", "gateway"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "CORRAL_API_KEYS" in run.stderr and "CORRAL_PORT" in run.stderr
    for leaked in (secret, "changeme", "hunter2"):
        assert leaked not in run.stderr + run.stdout
    flag = subprocess.run(  # noqa: PLW1510 - the exit status is asserted
        [sys.executable, "-m", "corral.cli", "gateway", "--api-keys", secret],
        env={k: v for k, v in env.items() if k != "CORRAL_API_KEYS"},
        capture_output=True,
        text=True,
    )
    assert flag.returncode == 2 and "unrecognized arguments" in flag.stderr
    settings = GatewaySettings(api_keys=secret)  # type: ignore[arg-type]
    assert secret not in repr(settings) and secret not in str(settings.model_dump())


def test_a_check_of_the_whole_settings_prints_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model-level check gets every setting as its input: none may reach the message."""
    monkeypatch.setenv("CORRAL_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    monkeypatch.setenv("CORRAL_LEVEL_MINOR", "0.9")
    monkeypatch.setenv("CORRAL_LEVEL_MAJOR", "0.5")
    with pytest.raises(ConfigError) as raised:
        SchedulerSettings.build()
    assert "LEVEL_MINOR" in str(raised.value.problems)
    assert "hunter2" not in str(raised.value.problems)


def test_keys_list_never_shows_a_key(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    keycli(redis_url, capsys, "class", "opus", "--key-rpm", "10")
    token = add_key(redis_url, capsys, "--id", "agent-1", "--class", "opus")
    listing = keycli(redis_url, capsys, "list") + keycli(redis_url, capsys, "list", "--json")
    assert "agent-1" in listing and "opus" in listing and token not in listing
    rows = json.loads(keycli(redis_url, capsys, "list", "--json"))
    assert rows[0]["id"] == "agent-1" and rows[0]["scopes"] == "user"
    keycli(redis_url, capsys, "set", "agent-1", "--scopes", "user,metrics", "--priority", "2")
    rows = json.loads(keycli(redis_url, capsys, "list", "--json"))
    assert rows[0]["scopes"] == "metrics,user" and rows[0]["priority"] == 2
    assert apikeys.main(["--redis-url", redis_url, "add", "--class", "nope"]) == 2
    assert apikeys.main(["--redis-url", redis_url, "add", "--scopes", "root"]) == 2


# --- audit, CORS ---


async def test_audit_log_lines(
    start_cluster: StartCluster,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    target = tmp_path / "audit.jsonl"
    cluster = await start_cluster(
        [FakeOllamaConfig()], gateway={"auth_cache_ttl": 0, "audit_log": str(target)}
    )
    keycli(redis_url, capsys, "class", "opus", "--priority-ceiling", "2", "--models", "llama3")
    token = add_key(redis_url, capsys, "--id", "agent", "--class", "opus")
    admin = add_key(redis_url, capsys, "--id", "root", "--scopes", "admin")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        headers = {"X-Corral-Priority": "0", **bearer(token)}
        ok = await client.post("/api/generate", json=GENERATE, headers=headers)
        assert ok.status_code == 200
        refused = await client.post(
            "/api/generate", json={**GENERATE, "model": "mistral"}, headers=headers
        )
        assert refused.status_code == 403
        assert (await client.get("/nodes", headers=bearer(admin))).status_code == 200
        assert (await client.get("/nodes", headers=bearer("wrong"))).status_code == 401
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    routed = next(line for line in lines if line.get("job") == ok.headers["x-corral-job-id"])
    assert (
        routed["key"] == "agent"
        and routed["class"] == "opus"
        and routed["model"] == "llama3:latest"
    )
    assert (routed["priority_asked"], routed["priority"], routed["status"]) == (0, 2, 200)
    assert routed["cache"] in ("miss", "bypass", "hit", "follow")
    assert any(line["status"] == 403 and line["key"] == "agent" for line in lines)
    assert any(line["path"] == "/nodes" and line["key"] == "root" for line in lines)
    assert any(line["path"] == "/nodes" and line["status"] == 401 for line in lines)
    assert token not in target.read_text() and admin not in target.read_text()


async def test_cors_is_off_by_default_and_answers_preflight_when_on(
    start_cluster: StartCluster,
) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    cluster = await start_cluster([FakeOllamaConfig()])
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        off = await client.options("/api/chat", headers=preflight)
        assert off.status_code == 405 and "access-control-allow-origin" not in off.headers
    await cluster.gateway.stop() if cluster.gateway else None
    await cluster.start_gateway(cors_origins="https://app.example", api_keys="k-123")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        on = await client.options("/api/chat", headers=preflight)
        assert on.status_code == 200
        assert on.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in on.headers["access-control-allow-headers"].lower()
        other = await client.options(
            "/api/chat", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert other.status_code == 400
        answered = await client.post(
            "/api/generate",
            json=GENERATE,
            headers={"Origin": "https://app.example", **bearer("k-123")},
        )
        assert answered.status_code == 200
        assert answered.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-corral-job-id" in answered.headers["access-control-expose-headers"].lower()


def test_key_changes_are_audited(
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = tmp_path / "audit.jsonl"
    monkeypatch.setenv("CORRAL_AUDIT_LOG", str(target))
    keycli(redis_url, capsys, "class", "opus")
    token = add_key(redis_url, capsys, "--id", "agent", "--class", "opus")
    keycli(redis_url, capsys, "revoke", "agent")
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["admin"] for line in lines] == ["class-set", "key-add", "key-revoke"]
    assert lines[1]["key"] == "agent" and lines[1]["class"] == "opus"
    assert token not in target.read_text()
