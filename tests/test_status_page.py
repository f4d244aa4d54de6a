"""The fleet at a glance: ``/metrics`` (Prometheus text), ``/status`` and ``/status.json``."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Awaitable, Callable

import httpx
import ollama
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from corral import keys
from corral.gateway import metrics as fleet_metrics
from corral.load import LoadReport
from corral.snapshot import NodeStatus, QueueStatus, RetryStatus, Snapshot, StreamStatus
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from tests.helpers import until, until_value

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
            assert kind in ("counter", "gauge", "histogram"), line
            declared.add(name)
            if kind == "histogram":
                declared.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
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
        assert "/status/dashboard.js" in page.text  # the page draws what /status.json holds
        status = (await http.get("/status.json")).json()
        assert [n["node_id"] for n in status["nodes"]] == [node]
        (queue,) = status["queues"]
        assert queue["model"] == "llama3:latest" and queue["queued"] == 1
        (stream,) = queue["streams"]
        assert (stream["priority"], stream["waiting"], stream["pending"]) == (5, 1, 1)
        assert status["gateway"] == gateway and status["waiting"] == 2
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
    "corral_degradation_level": ("gauge", set()),
    "corral_load_ratio": ("gauge", set()),
    "corral_expected_queue_wait_seconds": ("gauge", set()),
    "corral_drain_rate_jobs_per_second": ("gauge", {"model"}),
    "corral_gateway_waiting_requests": ("gauge", {"gateway"}),
    "corral_cache_requests": ("counter", {"outcome", "gateway"}),
    "corral_cache_evictions": ("counter", {"tier"}),
    "corral_cache_bytes": ("gauge", {"tier"}),
    "corral_queue_wait_seconds": ("histogram", {"model", "priority"}),
    "corral_time_to_first_token_seconds": (
        "histogram",
        {"model", "priority", "dialect", "outcome"},
    ),
    "corral_request_duration_seconds": ("histogram", {"model", "priority", "dialect", "outcome"}),
    "corral_requests": ("counter", {"model", "priority", "dialect", "outcome"}),
    "corral_generation_tokens_per_second": ("histogram", {"node", "model"}),
    "corral_generated_tokens": ("counter", {"node", "model"}),
}


async def test_metrics_parse_with_prometheus_client_and_count_a_known_workload(
    cluster: LocalCluster,
) -> None:
    jobs = 4
    node = cluster.nodes[0]
    gateway = cluster.gateway.state.gateway_id  # type: ignore[union-attr]
    job = {"model": "llama3:latest", "priority": "5", "dialect": "ollama", "outcome": "done"}
    tokens = 0
    async with (
        ollama.AsyncClient(host=cluster.url) as client,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
    ):
        for n in range(jobs):
            answer = await client.generate(
                model="llama3", prompt=f"p{n}", options={"num_predict": 3 + n}
            )
            tokens += answer.eval_count or 0
        # One answered by OpenAI's client's path, streamed: its own dialect label.
        streamed = await http.post(
            "/v1/chat/completions",
            json={
                "model": "llama3",
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        assert streamed.status_code == 200
        events = [
            orjson.loads(line[6:])
            for line in streamed.text.splitlines()
            if line.startswith("data: {")
        ]
        tokens += sum(e["usage"]["completion_tokens"] for e in events if e.get("usage"))

        # Every gateway and worker writes its figures to Redis about once a second.
        async def flushed() -> str:
            text = (await http.get("/metrics")).text
            done = f"corral_request_duration_seconds_count{{{_labels(job)}}} {float(jobs)}"
            return text if done in text and "corral_generated_tokens_total" in text else ""

        text = await until_value(flushed)
    reply = httpx.Response(200, text=text, headers={"content-type": CONTENT_TYPE_LATEST})
    assert reply.status_code == 200
    assert reply.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "\n# TYPE corral_job_events_total counter\n" in reply.text

    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    assert set(families) == set(DOCUMENTED)
    for name, family in families.items():
        kind, labels = DOCUMENTED[name]
        assert family.type == kind, name
        assert all(set(sample.labels) - {"le"} == labels for sample in family.samples), name

    def value(name: str, **labels: str) -> float:
        (match,) = [s.value for s in families[name].samples if s.labels == labels]
        return match

    events = families["corral_job_events"].samples
    assert {s.name for s in events} == {"corral_job_events_total"}
    assert value("corral_job_events", event="enqueued") == jobs + 1
    assert value("corral_job_events", event="done") == jobs + 1
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

    # The latency histograms and counters match the workload: 4 Ollama requests and 1
    # OpenAI one, all done at priority 5; every job waited in the queue once.
    openai_job = {**job, "dialect": "openai"}
    assert value("corral_requests", **job) == jobs
    assert value("corral_requests", **openai_job) == 1
    for name in ("corral_request_duration_seconds", "corral_time_to_first_token_seconds"):
        counts = [
            s.value for s in families[name].samples if s.name.endswith("_count") and s.labels == job
        ]
        assert counts == [jobs], name
        buckets = [
            s
            for s in families[name].samples
            if s.name.endswith("_bucket")
            and {k: v for k, v in s.labels.items() if k != "le"} == job
        ]
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == jobs
        assert all(a.value <= b.value for a, b in itertools.pairwise(buckets)), "cumulative"
    waits = [
        s.value for s in families["corral_queue_wait_seconds"].samples if s.name.endswith("_count")
    ]
    assert waits == [jobs + 1]
    assert value("corral_generated_tokens", node=node.node_id, model="llama3:latest") == tokens
    speed = [
        s.value
        for s in families["corral_generation_tokens_per_second"].samples
        if s.name.endswith("_count")
    ]
    assert speed == [jobs + 1]


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))


async def test_metrics_and_status_ask_for_a_key_when_keys_are_set(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster([FakeOllamaConfig()], gateway={"api_keys": "s3cret"})
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        for path in ("/metrics", "/status", "/status.json", "/status/series.json"):
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


async def test_series_endpoint_checks_its_query(cluster: LocalCluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        for query in ("resolution=5", "resolution=x", "span=0", "resolution=1&span=301"):
            reply = await http.get(f"/status/series.json?{query}")
            assert reply.status_code == 400 and "error" in reply.json(), query
        reply = await http.get("/status/series.json?resolution=10&span=3600")
        assert reply.status_code == 200
        body = reply.json()
        assert body["step"] == 10
        assert [g["id"] for g in body["graphs"]][:3] == ["requests", "queued", "wait"]
        assert all(len(line["values"]) == 360 for g in body["graphs"] for line in g["lines"])


async def test_the_dashboard_graphs_the_cache_hit_rate_and_the_level(
    cluster: LocalCluster, redis: Redis
) -> None:
    report = LoadReport(level=2, load=0.9, at=1.0, ttl=60)
    await redis.set(keys.LOAD, report.encode(), ex=60)
    body = {"model": "llama3", "prompt": "graph me", "stream": False, "options": {"temperature": 0}}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        outcomes = [(await http.post("/api/generate", json=body)).headers["x-corral-cache"]]
        outcomes += [(await http.post("/api/generate", json=body)).headers["x-corral-cache"]]
        assert outcomes == ["miss", "hit"]
        status = (await http.get("/status.json")).json()
        assert status["level"] == 2

        async def graphs() -> dict[str, dict[str, list[float | None]]]:
            body = (await http.get("/status/series.json?resolution=1&span=60")).json()
            return {
                g["id"]: {line["name"]: line["values"] for line in g["lines"]}
                for g in body["graphs"]
            }

        async def drawn() -> bool:
            seen = await graphs()
            hit_rates = [v for v in seen["cache"].get("hit", []) if v is not None]
            levels = [v for v in seen["level"].get("fleet", []) if v is not None]
            # 50 when the miss and the hit fell in the same second, 100 in the hit's own
            return any(rate >= 50.0 for rate in hit_rates) and 2.0 in levels

        await until(drawn, True, within=15)
