"""The command-line tools: ``corral status``, ``corral submit`` and ``corral demo``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from corral import fleet, status
from corral.jobs import JobSpec, JobStore
from corral.keys import JobKind
from corral.tooling import send
from corral.tooling.cluster import LocalCluster

DEMO_TIMEOUT = 90.0


def heartbeat(node_id: str) -> fleet.NodeRecord:
    return {
        "node_id": node_id,
        "state": "running",
        "models": [{"name": "llama3:latest"}, {"name": "qwen2:0.5b"}],
        "loaded": [{"name": "llama3:latest"}],
        "slots_total": 2,
        "slots_busy": 1,
        "cpu_percent": 12.5,
        "mem": {"total": 16 * 1024**3, "used": 4 * 1024**3, "percent": 25.0},
        "gpus": [
            {"index": 0, "name": "Test GPU", "util_percent": 40, "mem_used": 1, "mem_total": 2}
        ],
    }


# ---------------------------------------------------------------------------- status


def test_status_on_an_empty_redis(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main(["--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    assert "NODES  none" in out
    assert "QUEUES  none" in out
    assert "COUNTERS  none" in out


async def test_status_names_the_node_and_its_queue(
    redis_url: str, redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    await fleet.publish_heartbeat(redis, heartbeat("node-status-test"), ttl=30)
    store = JobStore(redis, job_ttl=60, result_ttl=60)
    spec = JobSpec(JobKind.GENERATE, "llama3:latest", b"{}", 3, "gw-test", stream=False)
    await store.enqueue(spec, max_queue=10)

    # The CLI runs its own event loop, so it runs in a thread beside this one.
    assert await asyncio.to_thread(status.main, ["--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    assert "node-status-test" in out
    assert "running" in out
    assert "slots 1/2" in out
    assert "loaded  llama3:latest" in out
    assert "llama3:latest                queued 1" in out
    assert "priority 3  length 1" in out
    assert "enqueued 1" in out
    assert "RETRIES  inbox 0  scheduled 0  dead letters 0" in out
    assert "GATEWAYS  0 live" in out


async def test_status_json(
    redis_url: str, redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    await fleet.publish_heartbeat(redis, heartbeat("node-json-test"), ttl=30)

    assert await asyncio.to_thread(status.main, ["--redis-url", redis_url, "--json"]) == 0
    snapshot = orjson.loads(capsys.readouterr().out)
    [node] = snapshot["nodes"]
    assert node["node_id"] == "node-json-test"
    assert node["state"] == "running"
    assert node["record"]["slots_total"] == 2
    assert snapshot["queues"] == []
    assert snapshot["retries"] == {"inbox": 0, "scheduled": 0, "dead_letters": 0}


def test_status_reports_an_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main(["--redis-url", "redis://127.0.0.1:1/0"]) == 1
    assert "cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------------------- submit


async def run_submit(*argv: str) -> int:
    # submit is synchronous; the fleet it talks to runs on this event loop.
    return await asyncio.to_thread(send.main, list(argv))


async def test_submit_streams_the_answer(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_submit(
        "--gateway", cluster.url, "--model", "llama3", "--prompt", "hello corral", "--priority", "0"
    )
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == "echo: hello corral\n"
    assert captured.err.startswith("job ")


async def test_submit_chat_without_streaming(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_submit(
        "--gateway", cluster.url, "--model", "qwen2:0.5b", "--prompt", "hi", "--chat", "--no-stream"
    )
    assert code == 0
    assert capsys.readouterr().out == "echo: hi\n"


async def test_submit_no_wait_prints_the_job_id(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_submit(
        "--gateway", cluster.url, "--model", "llama3", "--prompt", "later", "--no-wait"
    )
    assert code == 0
    job_id = capsys.readouterr().out.strip()
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        response = await http.get(f"/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["model"] == "llama3:latest"


async def test_submit_reports_an_unknown_model(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_submit("--gateway", cluster.url, "--model", "no-such-model", "--prompt", "x")
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert "404" in captured.err
    assert "not found" in captured.err


# ------------------------------------------------------------------------------ demo


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
@pytest.mark.parametrize(
    "flags",
    [[], ["--embedded-redis"]],
    ids=["redis-server", "embedded-redis"],  # the second: a machine without redis-server
)
def test_demo_runs_end_to_end(flags: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "demo", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the demo then stops its fleet instead of orphaning it.
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        pytest.fail(f"corral demo ran past {DEMO_TIMEOUT:g}s:\n{out}")
    assert proc.returncode == 0, out
    assert "ready in" in out
    assert "served by node-" in out
    assert "ollama.ResponseError 404" in out
    assert "-> done" in out
    assert "steps passed" in out
    assert "FAILED" not in out
    assert "corral_node_up" in out  # the metrics step read the fleet
    assert out.rstrip().splitlines()[-1].startswith("stopped in")
    assert time.monotonic() - started < DEMO_TIMEOUT
