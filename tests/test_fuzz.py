"""Schemathesis against the gateway's own OpenAPI document: no generated request, valid or
not, may make the gateway fail (5xx), in either dialect or the job API.

The fleet (fake Ollama, worker, gateway) runs in its own thread and event loop, so the
fuzzer's blocking HTTP calls reach it over real sockets. The number of examples per
operation and mode is ``CORRAL_FUZZ_EXAMPLES`` (default 40: 720 requests, about 20 s
here); set it higher for a longer run.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_sync
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from corral.gateway.routes import jobs, ollama, openai
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from corral.tooling.fake_ollama_config import DEFAULT_MODELS
from corral.tooling.redis_proc import RedisProcess

EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "40"))
# Answers a healthy fleet may give to a request it cannot serve right now; everything
# else at 500 or above is a failure of the gateway.
ALLOWED_5XX = {503, 504}


class _FleetThread:
    """A LocalCluster served from a thread of its own."""

    def __init__(self, redis_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fleet: LocalCluster = self._run(
            LocalCluster.start(
                redis_url,
                [FakeOllamaConfig(num_parallel=8)],
                gateway={
                    "request_timeout": 20.0,
                    "run_timeout": 10.0,
                    "max_body_bytes": 1024 * 1024,
                },
            )
        )

    def _run(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=60)

    def stop(self) -> None:
        self._run(self.fleet.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def fleet_url(redis_server: RedisProcess) -> Iterator[str]:
    redis_sync.Redis.from_url(redis_server.url).flushall()
    fleet = _FleetThread(redis_server.url)
    try:
        yield fleet.fleet.url
    finally:
        fleet.stop()


MODELS = [*DEFAULT_MODELS, None]
"""Positive cases mostly name a model the fleet serves (``None`` keeps the generated one)."""


def _serve_with(body: object, model: str) -> None:
    """Name a served model, and keep the answer short: the fake generates as many tokens
    as asked (a generated ``num_predict`` of 10^11 would stream for hours)."""
    if isinstance(body, dict):
        target = body.get("request") if isinstance(body.get("request"), dict) else body
        target["model"] = model
        for field in ("max_tokens", "max_completion_tokens"):  # OpenAI's names
            if field in target:
                target[field] = 8
        options = target.get("options")
        if isinstance(options, dict) and "num_predict" in options:
            options["num_predict"] = 8


PATHS = sorted({**ollama.BODIES, **openai.BODIES, **jobs.BODIES})


@pytest.fixture(scope="module")
def api_schema(fleet_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{fleet_url}/openapi.json")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
@pytest.mark.parametrize("path", PATHS)
def test_no_request_makes_the_gateway_fail(
    path: str, mode: GenerationMode, api_schema: Any, fleet_url: str
) -> None:
    """Positive cases follow the schema (most reach a node and are answered); negative
    ones break it in every way the schema allows, and must be refused with a 4xx."""
    operation = api_schema["/" + path.lstrip("/")]["POST"]
    statuses: Counter[int] = Counter()

    @given(case=operation.as_strategy(generation_mode=mode), model=st.sampled_from(MODELS))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case: Any, model: str | None) -> None:
        if mode is GenerationMode.POSITIVE and model is not None:
            _serve_with(case.body, model)  # a model the fleet has, so the job path runs
        response = case.call(base_url=fleet_url, timeout=60)
        status = response.status_code
        statuses[status] += 1
        assert status < 500 or status in ALLOWED_5XX, (
            f"{case.method} {case.path} -> {status}: {response.text[:500]}"
        )
        if status >= 400:
            # Ollama's shape on its paths and the job API, OpenAI's under /v1
            error = response.json()["error"]
            if case.path.startswith("/v1/"):
                assert isinstance(error["message"], str) and error["message"]
            else:
                assert isinstance(error, str) and error

    check()
    if mode is GenerationMode.NEGATIVE:
        assert not statuses[200], f"schema-breaking bodies accepted: {statuses}"
