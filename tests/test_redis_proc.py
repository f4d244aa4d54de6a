"""RedisProcess (a real redis-server child) and EmbeddedRedis (fakeredis over TCP)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from corral.tooling.redis_proc import (
    EmbeddedRedis,
    RedisProcess,
    RedisStartError,
    find_redis_server,
    free_port,
    start_best_redis,
)

needs_redis_server = pytest.mark.skipif(
    find_redis_server() is None, reason="redis-server is not installed"
)


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


def test_free_port_is_usable_and_not_6379() -> None:
    port = free_port()
    assert 0 < port < 65536
    assert port != 6379


# ------------------------------------------------------------------- RedisProcess


@needs_redis_server
def test_start_ping_and_stop_removes_temp_dir() -> None:
    proc = RedisProcess()
    with proc:
        assert proc.running
        assert proc.url == f"redis://127.0.0.1:{proc.port}/0"
        assert proc.port != 6379
        temp_dir = proc.dir
        assert temp_dir is not None
        assert temp_dir.is_dir()
        r = client(proc.url)
        try:
            assert r.ping() is True
            r.set("k", "v")
        finally:
            r.close()
        assert list(temp_dir.iterdir()) == []  # no RDB, no AOF, no log file
    assert not proc.running
    assert not temp_dir.exists()


@needs_redis_server
def test_given_dir_is_kept_and_left_empty_without_appendonly(tmp_path: Path) -> None:
    with RedisProcess(dir=tmp_path) as proc:
        r = client(proc.url)
        try:
            r.set("k", "v")
        finally:
            r.close()
    assert tmp_path.is_dir()
    assert list(tmp_path.iterdir()) == []


@needs_redis_server
def test_restart_with_appendonly_keeps_data_and_port() -> None:
    with RedisProcess(appendonly=True) as proc:
        port, pid = proc.port, proc.pid
        r = client(proc.url)
        try:
            r.set("corral:test", "kept")
            proc.restart()
            assert proc.port == port
            assert proc.pid != pid
            assert r.get("corral:test") == b"kept"  # redis-py reconnects by itself
        finally:
            r.close()


@needs_redis_server
def test_kill_is_a_crash_and_restart_recovers_fsynced_writes() -> None:
    # appendfsync always (extra args override the defaults): every acknowledged
    # write is on disk, so it must survive a SIGKILL.
    with RedisProcess(appendonly=True, extra_args=["--appendfsync", "always"]) as proc:
        r = client(proc.url)
        try:
            r.set("corral:test", "durable")
            pid = proc.pid
            assert pid is not None
            proc.kill()
            assert not proc.running
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # reaped, not a zombie we still own
            with pytest.raises(redis.ConnectionError):
                r.ping()
            proc.restart()
            assert r.get("corral:test") == b"durable"
        finally:
            r.close()


@needs_redis_server
def test_start_failure_reports_redis_log() -> None:
    proc = RedisProcess(extra_args=["--no-such-option", "1"], startup_timeout=5)
    started = time.monotonic()
    with pytest.raises(RedisStartError, match="no-such-option"):
        proc.start()
    assert time.monotonic() - started < 5  # noticed the exit, did not wait it out
    assert not proc.running
    assert proc.dir is None  # its temp dir was cleaned up


def test_refuses_port_6379() -> None:
    with pytest.raises(ValueError, match="6379"):
        RedisProcess(port=6379)
    with pytest.raises(ValueError, match="6379"):
        EmbeddedRedis(port=6379)


def test_session_fixture_is_private(redis_server: RedisProcess, redis_url: str) -> None:
    assert redis_server.port != 6379
    assert redis_url == redis_server.url
    r = client(redis_url)
    try:
        assert r.dbsize() == 0
        assert str(r.info("server")["redis_version"]).startswith(("7.", "8."))
        r.set("leftover", "x")  # the next test's redis_url must not see it
    finally:
        r.close()


async def test_async_fixture_starts_clean(redis: Redis) -> None:
    assert await redis.dbsize() == 0
    await redis.set("corral:t:k", "v")
    assert await redis.get("corral:t:k") == b"v"  # bytes: decode_responses=False


# ------------------------------------------------------------------ EmbeddedRedis


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedRedis]:
    pytest.importorskip("fakeredis")
    with EmbeddedRedis() as server:
        yield server


def test_embedded_ping(embedded: EmbeddedRedis) -> None:
    assert embedded.running
    assert embedded.url == f"redis://127.0.0.1:{embedded.port}/0?protocol=2"
    r = client(embedded.url)
    try:
        assert r.ping() is True
    finally:
        r.close()


def test_embedded_stream_round_trip(embedded: EmbeddedRedis) -> None:
    r = client(embedded.url)
    try:
        r.delete("corral:t:stream")
        r.xgroup_create("corral:t:stream", "g", id="0", mkstream=True)
        entry_id = r.xadd("corral:t:stream", {"job": "j1"})
        got = r.xreadgroup("g", "c1", {"corral:t:stream": ">"}, count=1)
        assert got == [[b"corral:t:stream", [(entry_id, {b"job": b"j1"})]]]
        assert r.xack("corral:t:stream", "g", entry_id) == 1
        assert r.xpending("corral:t:stream", "g")["pending"] == 0
    finally:
        r.close()


def test_embedded_pubsub(embedded: EmbeddedRedis) -> None:
    sub = client(embedded.url)
    pub = client(embedded.url)
    pubsub = sub.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe("corral:t:chan")
        pubsub.get_message(timeout=1)  # consume the subscribe confirmation
        assert pub.publish("corral:t:chan", b"hello") == 1
        deadline = time.monotonic() + 5
        message = None
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
        assert message is not None
        assert message["channel"] == b"corral:t:chan"
        assert message["data"] == b"hello"
    finally:
        pubsub.close()
        sub.close()
        pub.close()


def test_embedded_runs_lua(embedded: EmbeddedRedis) -> None:
    r = client(embedded.url)
    try:
        assert r.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, "corral:t:n", 3) == 3
    finally:
        r.close()


def test_embedded_stop_closes_the_port() -> None:
    pytest.importorskip("fakeredis")
    server = EmbeddedRedis().start()
    url = server.url
    server.stop()
    assert not server.running
    r = client(url)
    try:
        with pytest.raises(redis.ConnectionError):
            r.ping()
    finally:
        r.close()


# ---------------------------------------------------------------- start_best_redis


@needs_redis_server
def test_start_best_redis_prefers_the_real_one() -> None:
    server = start_best_redis()
    try:
        assert isinstance(server, RedisProcess)
    finally:
        server.stop()


def test_start_best_redis_can_prefer_the_embedded_one() -> None:
    pytest.importorskip("fakeredis")
    server = start_best_redis(prefer_real=False)
    try:
        assert isinstance(server, EmbeddedRedis)
        r = client(server.url)
        try:
            assert r.ping() is True
        finally:
            r.close()
    finally:
        server.stop()
