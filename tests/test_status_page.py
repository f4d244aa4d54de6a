"""The fleet at a glance: ``/metrics`` (Prometheus text) and ``/status`` (HTML)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import httpx
import ollama
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from corral import keys
from corral.gateway import metrics as fleet_metrics
from corral.snapshot import NodeStatus, QueueStatus, RetryStatus, Snapshot, StreamStatus
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import until

StartCluster = Callable[..., Awaitable[LocalCluster]]

SAMPLE = re.compile(r'^([a-z_:][a-z0-9_:]*)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse(text: str) -> dict[str, float]:
    """``{'name{labels}': value}``, checking the exposition format on the way."""
    samples: dict[str, float] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge"), line
            declared.add(name)
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        assert match.group(1) in declared, f"{match.group(1)} has no # TYPE before it"
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


async def metrics(http: httpx.AsyncClient) -> dict[str, float]:
    reply = await http.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == CONTENT_TYPE_LATEST
    return parse(reply.text)


async def test_metrics_count_the_fleet_the_jobs_and_what_waits(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster([FakeOllamaConfig(num_parallel=1, token_rate=50)])
    node = cluster.nodes[0].node_id
    fake = cluster.nodes[0].fake.fake
    gateway = cluster.gateway.state.gateway_id  # type: ignore[union-attr]
    async with (
        ollama.AsyncClient(host=cluster.url) as client,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
    ):
        for n in range(3):
            await client.generate(model="llama3", prompt=f"p{n}", options={"num_predict": 1})
        seen = await metrics(http)
        assert seen['corral_job_events_total{event="enqueued"}'] == 3
        assert seen['corral_job_events_total{event="done"}'] == 3
        assert seen[f'corral_node_up{{node="{node}"}}'] == 1
        assert seen[f'corral_node_slots{{node="{node}"}}'] == 1
        assert seen[f'corral_node_model_available{{model="llama3:latest",node="{node}"}}'] == 1
        assert seen["corral_gateways_live"] == 1
        assert seen["corral_dead_letter_jobs"] == 0

        # One job runs (slowly) on the only slot and one waits behind it.
        running = asyncio.create_task(
            client.generate(model="llama3", prompt="long", options={"num_predict": 200})
        )
        await fake.wait_until(lambda s: s["active"] == 1)
        queued = asyncio.create_task(client.generate(model="llama3", prompt="next"))
        redis = cluster.gateway.state.redis  # type: ignore[union-attr]
        await until(lambda: redis.get(keys.queued_count("llama3:latest")), b"1")
        seen = await metrics(http)
        assert seen['corral_queued_jobs{model="llama3:latest"}'] == 1
        assert seen['corral_running_jobs{model="llama3:latest",priority="5"}'] == 1
        assert seen[f'corral_gateway_waiting_requests{{gateway="{gateway}"}}'] == 2

        page = await http.get("/status")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert node in page.text and "llama3:latest" in page.text
        assert "<th>jobs queued</th><td class='num'>1</td>" in page.text
        for task in (running, queued):
            task.cancel()
        await asyncio.wait([running, queued])


# README's metric table, which dashboards depend on: family name -> (type, label names).
# prometheus-client names a counter family without its `_total`; its samples carry it.
DOCUMENTED: dict[str, tuple[str, set[str]]] = {
    "corral_job_events": ("counter", {"event"}),
    "corral_queued_jobs": ("gauge", {"model"}),
    "corral_running_jobs": ("gauge", {"model", "priority"}),
    "corral_stream_entries": ("gauge", {"model", "priority"}),
    "corral_node_up": ("gauge", {"node"}),
    "corral_node_info": ("gauge", {"node", "state", "version", "ollama_url"}),
    "corral_node_heartbeat_age_seconds": ("gauge", {"node"}),
    "corral_node_slots": ("gauge", {"node"}),
    "corral_node_busy_slots": ("gauge", {"node"}),
    "corral_node_breaker_open": ("gauge", {"node"}),
    "corral_node_cpu_percent": ("gauge", {"node"}),
    "corral_node_memory_percent": ("gauge", {"node"}),
    "corral_node_gpu_utilization_percent": ("gauge", {"node", "gpu", "name"}),
    "corral_node_gpu_memory_used_bytes": ("gauge", {"node", "gpu", "name"}),
    "corral_node_gpu_memory_total_bytes": ("gauge", {"node", "gpu", "name"}),
    "corral_node_model_available": ("gauge", {"node", "model"}),
    "corral_node_model_loaded": ("gauge", {"node", "model"}),
    "corral_retry_inbox_jobs": ("gauge", set()),
    "corral_retry_scheduled_jobs": ("gauge", set()),
    "corral_dead_letter_jobs": ("gauge", set()),
    "corral_gateways_live": ("gauge", set()),
    "corral_gateway_waiting_requests": ("gauge", {"gateway"}),
}


async def test_metrics_parse_with_prometheus_client_and_count_a_known_workload(
    cluster: LocalCluster,
) -> None:
    jobs = 4
    node = cluster.nodes[0]
    gateway = cluster.gateway.state.gateway_id  # type: ignore[union-attr]
    async with (
        ollama.AsyncClient(host=cluster.url) as client,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
    ):
        for n in range(jobs):
            await client.generate(model="llama3", prompt=f"p{n}", options={"num_predict": 1})
        reply = await http.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "\n# TYPE corral_job_events_total counter\n" in reply.text

    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    assert set(families) == set(DOCUMENTED)
    for name, family in families.items():
        kind, labels = DOCUMENTED[name]
        assert family.type == kind, name
        assert all(set(sample.labels) == labels for sample in family.samples), name

    def value(name: str, **labels: str) -> float:
        (match,) = [s.value for s in families[name].samples if s.labels == labels]
        return match

    events = families["corral_job_events"].samples
    assert {s.name for s in events} == {"corral_job_events_total"}
    assert value("corral_job_events", event="enqueued") == jobs
    assert value("corral_job_events", event="done") == jobs
    assert value("corral_queued_jobs", model="llama3:latest") == 0
    assert value("corral_running_jobs", model="llama3:latest", priority="5") == 0
    assert value("corral_node_up", node=node.node_id) == 1
    assert value("corral_node_slots", node=node.node_id) == 2
    (info,) = families["corral_node_info"].samples
    assert info.labels["node"] == node.node_id and info.labels["state"] == "running"
    assert value("corral_node_model_available", node=node.node_id, model="llama3:latest") == 1
    assert value("corral_gateways_live") == 1
    assert value("corral_gateway_waiting_requests", gateway=gateway) == 0
    assert value("corral_dead_letter_jobs") == 0


async def test_metrics_and_status_ask_for_a_key_when_keys_are_set(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"api_keys": "s3cret"})
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        for path in ("/metrics", "/status"):
            assert (await http.get(path)).status_code == 401
            authorised = await http.get(path, headers={"authorization": "Bearer s3cret"})
            assert authorised.status_code == 200


def test_metrics_escape_labels_and_leave_out_absent_fields() -> None:
    snapshot = Snapshot(
        redis_url="redis://x",
        taken_at=0.0,
        nodes=[
            NodeStatus(
                'gpu"box\\1\n',
                "running",
                0.25,
                {"slots_total": 4, "gpus": [{"index": 0, "name": "H100", "util_percent": 87}]},
            )
        ],
        queues=[QueueStatus("llama3:latest", 2, [StreamStatus(0, 3, 1)])],
        stats={"done": 10},
        retries=RetryStatus(1, 2, 3),
        gateways=1,
    )
    seen = parse(fleet_metrics.render(snapshot, gateway_id="gw", waiting=0).decode())
    label = 'node="gpu\\"box\\\\1\\n"'
    assert seen[f"corral_node_heartbeat_age_seconds{{{label}}}"] == 0.25
    assert seen[f"corral_node_slots{{{label}}}"] == 4
    assert seen[f'corral_node_gpu_utilization_percent{{gpu="0",name="H100",{label}}}'] == 87
    assert seen['corral_stream_entries{model="llama3:latest",priority="0"}'] == 3
    assert seen["corral_retry_scheduled_jobs"] == 2
    assert seen["corral_dead_letter_jobs"] == 3
    assert "corral_node_busy_slots" not in "".join(seen)  # absent from the record: no sample
