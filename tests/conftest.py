"""Shared pytest fixtures.

The suite runs against a real ``redis-server`` that it starts itself, on a free
loopback port in a temporary directory, once per session. It never touches a Redis
already running on the machine (such as one on port 6379) and never falls back to
fakeredis: the queue's guarantees depend on real Redis semantics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis as redis_sync
from redis.asyncio import Redis

from corral.tooling.redis_proc import RedisProcess, find_redis_server

_NO_REDIS_SERVER = """\
redis-server was not found on PATH, in /usr/sbin or in /usr/local/bin.
The tests start their own real Redis and need the redis-server binary (7.0 or newer):
  Debian/Ubuntu:  sudo apt-get install redis-server
  Fedora/RHEL:    sudo dnf install redis
  macOS:          brew install redis
(The package's own service need not run: the tests use a private port.)"""


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One real ``redis-server`` for the whole session, on a free port (never 6379)."""
    if find_redis_server() is None:
        pytest.fail(_NO_REDIS_SERVER, pytrace=False)
    server = RedisProcess()
    server.start()
    assert server.port != 6379
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session Redis's URL, emptied with ``FLUSHALL`` so each test starts clean."""
    if not redis_server.running:  # a test killed it: bring it back on the same port
        redis_server.restart()
    client = redis_sync.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """An asyncio client (bytes in, bytes out) on the clean session Redis."""
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


# --- system fixtures (gateway, workers, fake Ollama) ---

# Imported here, not at the top, so a broken fleet import fails only the system tests.
from corral.tooling.cluster import LocalCluster  # noqa: E402
from corral.tooling.fake_ollama import FakeOllamaConfig  # noqa: E402


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[LocalCluster]:
    """One fake node (default models, 2 slots), its worker, and a gateway, all started."""
    fleet = await LocalCluster.start(redis_url, [FakeOllamaConfig(num_parallel=2)])
    try:
        yield fleet
    finally:
        await fleet.stop()


@pytest.fixture
async def start_cluster(redis_url: str) -> AsyncIterator[object]:
    """A factory for tests that need their own fleet shape; everything is stopped after."""
    started: list[LocalCluster] = []

    async def start(nodes: list[FakeOllamaConfig], **options: object) -> LocalCluster:
        fleet = await LocalCluster.start(redis_url, nodes, **options)  # type: ignore[arg-type]
        started.append(fleet)
        return fleet

    try:
        yield start
    finally:
        for fleet in started:
            await fleet.stop()
