"""What a newcomer hit: 404 and 405 answered as JSON in each dialect, the job id header
on every answer about a job, and a kept demo fleet saying how to reach it."""

from __future__ import annotations

import httpx

from corral.tooling.cluster import LocalCluster
from corral.tooling.demo import client_hints


async def test_404_and_405_are_json_in_each_dialect(cluster: LocalCluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        for method, path, status in (
            ("GET", "/api/nothing", 404),
            ("GET", "/api/generate", 405),
            ("DELETE", "/api/tags", 405),
        ):
            reply = await http.request(method, path)
            assert reply.status_code == status, path
            assert reply.headers["content-type"].startswith("application/json")
            assert set(reply.json()) == {"error"} and path in reply.json()["error"]
        for method, path, status in (
            ("GET", "/v1/nothing", 404),
            ("GET", "/v1/chat/completions", 405),
        ):
            reply = await http.request(method, path)
            assert reply.status_code == status, path
            error = reply.json()["error"]
            assert path in error["message"] and error["type"], path
        # A parameterised path (through Starlette's router) answers the same way.
        reply = await http.put("/jobs/abc")
        assert reply.status_code == 405 and "error" in reply.json()
        assert "GET" in reply.headers.get("allow", "")


async def test_every_answer_about_a_job_names_it(cluster: LocalCluster) -> None:
    body = {"kind": "generate", "request": {"model": "llama3", "prompt": "hi"}, "wait": False}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        queued = await http.post("/jobs", json=body)
        assert queued.status_code == 202
        job_id = queued.json()["id"]
        assert queued.headers["x-corral-job-id"] == job_id
        fetched = await http.get(f"/jobs/{job_id}")
        assert fetched.headers["x-corral-job-id"] == job_id
        waited = await http.post("/jobs", json={**body, "wait": True})
        assert waited.headers["x-corral-job-id"] == waited.json()["id"]


def test_a_kept_demo_says_how_to_reach_its_gateway_and_redis() -> None:
    hints = "\n".join(client_hints("http://127.0.0.1:8123", "redis://127.0.0.1:6390/0"))
    assert "OLLAMA_HOST=http://127.0.0.1:8123" in hints
    assert "redis-cli -h 127.0.0.1 -p 6390" in hints
