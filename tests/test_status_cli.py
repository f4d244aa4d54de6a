"""``corral status --once``, ``--json`` and ``--top`` against a running fleet, and the hint
an empty Redis gets."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import ollama
import orjson

from corral.tooling.cluster import LocalCluster
from tests.helpers import until_value


def _status(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", "status", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "CORRAL_REDIS_URL": redis_url, "COLUMNS": "200"},
    )


async def test_status_once_and_json_show_the_fleet_and_its_rates(
    cluster: LocalCluster, redis_url: str
) -> None:
    async with ollama.AsyncClient(host=cluster.url) as client:
        for n in range(3):
            await client.generate(model="llama3", prompt=f"p{n}", options={"num_predict": 2})

    # The rates come from the per-second series, written about once a second.
    async def counted() -> dict[str, object]:
        done = await asyncio.to_thread(_status, redis_url, "--json")
        assert done.returncode == 0, done.stderr
        body = orjson.loads(done.stdout)
        return body if body["rates"]["requests_per_s"].get("done") else {}

    body = await until_value(counted, within=20)
    assert [n["node_id"] for n in body["nodes"]] == ["node1"]
    assert body["nodes"][0]["state"] == "running"
    assert body["stats"]["done"] == 3
    rates = body["rates"]
    assert rates["window_s"] == 10
    # 3 requests within the last 10 s: 0.3 a second, or fewer if one fell out of the window.
    assert 0 < rates["requests_per_s"]["done"] <= 0.3 + 1e-9
    assert rates["latency_s"]["total p50"] > 0
    assert "hint" not in body

    once = await asyncio.to_thread(_status, redis_url, "--once", "--top")
    assert once.returncode == 0, once.stderr
    for expected in ("node1", "running", "llama3:latest", "requests/s done", "total p95"):
        assert expected in once.stdout, (expected, once.stdout)


def test_status_on_an_empty_redis_says_it_may_be_the_wrong_one(redis_url: str) -> None:
    for args in ((), ("--once",)):
        done = _status(redis_url, *args)
        assert done.returncode == 0, done.stderr
        assert "Is this the Redis" in " ".join(done.stdout.split()), done.stdout
    body = orjson.loads(_status(redis_url, "--json").stdout)
    assert "Is this the Redis" in body["hint"]


def test_status_watch_refuses_a_period_of_zero(redis_url: str) -> None:
    done = _status(redis_url, "--watch", "0")
    assert done.returncode == 2 and "--watch" in done.stderr


async def test_corral_bench_loads_a_running_gateway(cluster: LocalCluster) -> None:
    argv = [sys.executable, "-m", "corral.cli", "bench", "--gateway", cluster.url]
    argv += ["--requests", "12", "--concurrency", "3", "--num-predict", "4", "--json"]
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert (summary["requests"], summary["ok"], summary["errors"]) == (12, 12, {})
    assert summary["requests_per_s"] > 0 and summary["tokens_per_s"] > 0
    assert summary["total_ms"]["p50"] <= summary["total_ms"]["p99"]
    redis = cluster.gateway.state.redis  # type: ignore[union-attr]
    assert int(await redis.hget("corral:stats", "done")) == 12


def test_corral_bench_refuses_zero_requests() -> None:
    argv = [sys.executable, "-m", "corral.cli", "bench", "--gateway", "http://x", "--requests", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "--requests" in done.stderr
