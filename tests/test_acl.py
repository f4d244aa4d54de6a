"""The shipped ACL file (deploy/users.acl) lets each role do its whole job and no more.

A real ``redis-server`` loads the file as shipped, with its CHANGE-ME passwords replaced,
and the admin loads Corral's Functions library (``corral redis-setup``); the gateway,
the worker and the scheduler (its RQ worker child included) each run as their own user
through a request, a retry, a dead letter and its requeue, while ``ACL LOG`` records
every command, key or channel Redis refused anyone. Each role is refused what the
threat model (README "Security") says it cannot do.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.retry import Retry
from rq import Queue
from rq.registry import FailedJobRegistry

from corral import keys, scripts
from corral.scheduler import dlq
from corral.scheduler.retries import rq_job_id
from corral.snapshot import dead_letter_key
from corral.tooling.cluster import LocalCluster
from corral.tooling.fake_ollama import FakeOllamaConfig
from corral.tooling.redis_proc import RedisProcess, find_redis_server
from tests.helpers import until

ACL_FILE = Path(__file__).resolve().parents[1] / "deploy" / "users.acl"
ROLES = ("gateway", "worker", "scheduler")
GENERATE = {"model": "llama3", "prompt": "hello", "stream": False}


@dataclass(frozen=True)
class AclRedis:
    server: RedisProcess
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.server.port}/0"

    def client(self, user: str) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(self.url(user))

    def denials(self) -> list[dict[str, Any]]:
        """What ``ACL LOG`` recorded: who was refused which command, key or channel."""
        admin = self.client("admin")
        try:
            return [
                {k: entry[k] for k in ("username", "reason", "context", "object")}
                for entry in admin.acl_log()
            ]
        finally:
            admin.close()


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    """A ``redis-server`` that loads the shipped ACL file with generated passwords."""
    if find_redis_server() is None:
        pytest.fail("redis-server not found (see tests/conftest.py)", pytrace=False)
    text = ACL_FILE.read_text(encoding="utf-8")
    passwords = {user: secrets.token_hex(16) for user in ("admin", *ROLES)}
    for user, password in passwords.items():
        placeholder = f">CHANGE-ME-{user}-password"
        assert placeholder in text, f"users.acl has no {placeholder}"
        text = text.replace(placeholder, f">{password}")
    assert "CHANGE-ME" not in text
    path = tmp_path_factory.mktemp("acl") / "users.acl"
    path.write_text(text, encoding="utf-8")
    server = RedisProcess(
        extra_args=["--aclfile", str(path)], auth=("admin", passwords["admin"])
    ).start()
    try:
        acl = AclRedis(server, passwords)
        admin = acl.client("admin")
        try:
            scripts.load_sync(admin)  # what `corral redis-setup` does
        finally:
            admin.close()
        yield acl
    finally:
        server.stop()


@pytest.fixture
def acl(acl_redis: AclRedis) -> AclRedis:
    """The ACL Redis emptied, with an empty ``ACL LOG``."""
    admin = acl_redis.client("admin")
    try:
        admin.flushall()
        admin.acl_log_reset()
    finally:
        admin.close()
    return acl_redis


async def test_each_role_runs_the_whole_flow_as_its_own_user(acl: AclRedis) -> None:
    cluster = await LocalCluster.start(
        acl.url("admin"),  # used by no process: each names its own user below
        [FakeOllamaConfig(fail_next=1)],
        gateway={"redis_url": acl.url("gateway"), "max_attempts": 2},
        worker={"redis_url": acl.url("worker")},
        scheduler={
            "redis_url": acl.url("scheduler"),
            "retry_base": 0.05,
            "retry_cap": 0.05,
        },
    )
    fake = cluster.nodes[0].fake.fake
    scheduler_redis = acl.client("scheduler")
    registry = FailedJobRegistry(queue=Queue(keys.RETRY_QUEUE, connection=scheduler_redis))
    try:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
            # Answered after one retry: worker -> retry inbox -> scheduler -> RQ -> stream.
            reply = await http.post("/api/generate", json=GENERATE)
            assert reply.status_code == 200, reply.text
            assert reply.json()["response"] == "echo: hello"
            job = (await http.get(f"/jobs/{reply.headers['x-corral-job-id']}")).json()
            assert job["state"] == "done" and job["attempts"] == 2

            # Failing every attempt: dead-lettered in RQ's failed registry.
            fake.configure(fail_next=100)
            reply = await http.post("/api/generate", json=GENERATE)
            assert reply.status_code == 503 and "gave up after 2" in reply.text
            dead_id = reply.headers["x-corral-job-id"]
            await until(lambda: asyncio.to_thread(registry.get_job_ids), [rq_job_id(dead_id, 2)])

            # The gateway reads the dead-letter count (an RQ key) for both pages.
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200, metrics.text
            (dead,) = [
                sample.value
                for family in text_string_to_metric_families(metrics.text)
                for sample in family.samples
                if sample.name == "corral_dead_letter_jobs"
            ]
            assert dead == 1
            status = await http.get("/status")
            assert status.status_code == 200, status.text

            # Requeued from the dead-letter queue as `corral dlq retry` does, as the
            # scheduler user: it runs through the fleet again and completes.
            fake.configure(fail_next=0)
            argv = ["--redis-url", acl.url("scheduler"), "retry", dead_id]
            assert await asyncio.to_thread(dlq.main, argv) == 0

            async def state() -> str:
                return str((await http.get(f"/jobs/{dead_id}")).json()["state"])

            await until(state, "done", within=20)
        # Trimming and pruning ran too: a whole pass, not only the retry half of one.
        passes = cluster.scheduler.scheduler.passes  # type: ignore[union-attr]
        await until(lambda: _passes_after(cluster, passes), True)
    finally:
        await cluster.stop()
        scheduler_redis.close()
        # Checked even when the flow failed: a refusal is then most likely why.
        denied = acl.denials()
        assert denied == [], denied


async def _passes_after(cluster: LocalCluster, passes: int) -> bool:
    return cluster.scheduler.scheduler.passes > passes  # type: ignore[union-attr]


# Each callable is something no role may do; the test Redis is private, so one that
# wrongly succeeds harms nothing but this test.
FORBIDDEN: dict[str, Callable[[redis_sync.Redis], object]] = {
    "FLUSHALL": lambda r: r.flushall(),
    "FLUSHDB": lambda r: r.flushdb(),
    "CONFIG GET": lambda r: r.config_get("requirepass"),
    "CONFIG SET": lambda r: r.config_set("maxmemory", "1"),
    "SCRIPT FLUSH": lambda r: r.script_flush(),
    "KEYS": lambda r: r.keys("*"),
    "GET outside corral": lambda r: r.get("session:1234"),
    "SET outside corral": lambda r: r.set("session:1234", "x"),
    "SUBSCRIBE outside corral": lambda r: _subscribe(r, "__keyspace@0__:session:1234"),
    "ACL LIST": lambda r: r.acl_list(),
    "CLIENT LIST": lambda r: r.client_list(),
    "FUNCTION FLUSH": lambda r: r.function_flush(),
    # No arbitrary Lua: a CPU-bound script would freeze Redis for everyone.
    "EVAL": lambda r: r.eval("return 1", 0),
    "EVALSHA": lambda r: r.evalsha("e0e1f9fabfc9d4800c877a703b823ac0578ff8db", 0),
    "EVAL_RO": lambda r: r.eval_ro("return 1", 0),
    "SCRIPT LOAD": lambda r: r.script_load("return 1"),
    "FUNCTION LOAD": lambda r: r.function_load(
        "#!lua name=intruder\nredis.register_function('intruder', function() return 1 end)"
    ),
    "FUNCTION DELETE": lambda r: r.function_delete(f"corral_{scripts.version()}"),
    # No deleting what is not its own to delete, nor taking entries from the group.
    "DEL a queue stream": lambda r: r.delete("corral:q:{m}:p5"),
    "DEL a job record": lambda r: r.delete("corral:job:0123"),
    "UNLINK a queue stream": lambda r: r.unlink("corral:q:{m}:p5"),
    "XGROUP DESTROY": lambda r: r.xgroup_destroy("corral:q:{m}:p5", "corral"),
    "XGROUP SETID": lambda r: r.xgroup_setid("corral:q:{m}:p5", "corral", "$"),
    "RENAME a queue stream": lambda r: r.rename("corral:q:{m}:p5", "corral:x"),
    "MOVE": lambda r: r.move("corral:stats", 1),
}


def _subscribe(client: redis_sync.Redis, channel: str, *, pattern: bool = False) -> None:
    pubsub = client.pubsub()
    try:
        (pubsub.psubscribe if pattern else pubsub.subscribe)(channel)
        pubsub.get_message(timeout=1.0)  # a refusal arrives as the reply
    finally:
        pubsub.close()


@pytest.mark.parametrize("action", sorted(FORBIDDEN))
@pytest.mark.parametrize("role", ROLES)
def test_no_role_may_administer_redis_or_touch_other_keys(
    acl: AclRedis, role: str, action: str
) -> None:
    client = acl.client(role)
    try:
        with pytest.raises(NoPermissionError):
            FORBIDDEN[action](client)
    finally:
        client.close()


# What one role may not do although another may (its neighbours' powers).
ROLE_LIMITS: dict[str, dict[str, Callable[[redis_sync.Redis], object]]] = {
    "gateway": {
        "XREADGROUP": lambda r: r.xreadgroup("corral", "c", {"corral:q:{m}:p5": ">"}),
        "XAUTOCLAIM": lambda r: r.xautoclaim("corral:q:{m}:p5", "corral", "c", 0),
        "XTRIM": lambda r: r.xtrim("corral:q:{m}:p5", minid="0-1"),
        "XDEL": lambda r: r.xdel("corral:q:{m}:p5", "0-1"),
        "write the dead-letter registry": lambda r: r.zadd(dead_letter_key(), {"x": 1}),
        "read an RQ job": lambda r: r.hgetall("rq:job:corral-x-1"),
        "XGROUP DELCONSUMER": lambda r: r.xgroup_delconsumer("corral:q:{m}:p5", "corral", "n"),
        "PSUBSCRIBE every Corral channel": lambda r: _subscribe(r, "corral:*", pattern=True),
        "PSUBSCRIBE every reply channel": lambda r: _subscribe(r, "corral:reply:*", pattern=True),
        "SUBSCRIBE outside reply channels": lambda r: _subscribe(r, "corral:other"),
        "DEL the node registry": lambda r: r.delete(keys.NODES),
    },
    "worker": {
        "XTRIM": lambda r: r.xtrim("corral:q:{m}:p5", minid="0-1"),
        "XDEL": lambda r: r.xdel("corral:q:{m}:p5", "0-1"),
        "XGROUP DESTROY": lambda r: r.xgroup_destroy("corral:q:{m}:p5", "corral"),
        "read the dead-letter registry": lambda r: r.zcard(dead_letter_key()),
        "read an RQ job": lambda r: r.hgetall("rq:job:corral-x-1"),
        "write an RQ job": lambda r: r.hset("rq:job:corral-x-1", "data", "x"),
        "XGROUP DELCONSUMER": lambda r: r.xgroup_delconsumer("corral:q:{m}:p5", "corral", "n"),
        "PSUBSCRIBE every Corral channel": lambda r: _subscribe(r, "corral:*", pattern=True),
        "SUBSCRIBE outside its channels": lambda r: _subscribe(r, "corral:other"),
        "DEL the retry inbox": lambda r: r.delete(keys.RETRY_INBOX),
        "DEL a cache entry": lambda r: r.delete(keys.cache_entry("x")),
    },
    "scheduler": {
        "SUBSCRIBE outside RQ's command channels": lambda r: _subscribe(r, "rq:other"),
        "PSUBSCRIBE every RQ channel": lambda r: _subscribe(r, "rq:*", pattern=True),
    },
}


@pytest.mark.parametrize(
    ("role", "action"),
    [(role, action) for role, limits in ROLE_LIMITS.items() for action in limits],
)
def test_each_role_lacks_what_only_others_need(acl: AclRedis, role: str, action: str) -> None:
    client = acl.client(role)
    try:
        with pytest.raises(NoPermissionError):
            ROLE_LIMITS[role][action](client)
    finally:
        client.close()


def test_the_default_user_is_off(acl: AclRedis) -> None:
    # No retries: redis-py counts a refused AUTH as a connection error and would retry.
    client = redis_sync.Redis(port=acl.server.port, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(AuthenticationError):
            client.get("corral:stats")
    finally:
        client.close()


# Too disruptive to run even on a private Redis: asked of ACL DRYRUN instead.
DISRUPTIVE = [
    ("SHUTDOWN", "NOSAVE"),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("BGREWRITEAOF",),
    ("SAVE",),
    ("DEBUG", "SEGFAULT"),
    ("MODULE", "LOAD", "/nonexistent.so"),
    ("ACL", "SETUSER", "intruder", "on", "nopass", "+@all"),
    ("FAILOVER",),
    ("MIGRATE", "127.0.0.1", "1", "corral:stats", "0", "1000"),
    ("SCRIPT", "KILL"),
    ("CLIENT", "KILL", "ID", "1"),
]


@pytest.mark.parametrize("command", DISRUPTIVE, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize("role", ROLES)
def test_no_role_may_stop_or_reconfigure_redis(
    acl: AclRedis, role: str, command: tuple[str, ...]
) -> None:
    admin = acl.client("admin")
    try:
        verdict = admin.execute_command("ACL", "DRYRUN", role, *command)
    finally:
        admin.close()
    assert verdict != b"OK" and b"no permissions" in verdict


async def test_every_role_may_read_the_redis_clock_directly_and_call_corrals_functions(
    acl: AclRedis,
) -> None:
    touch = scripts.function_name("touch")
    for role in ROLES:
        client = acl.client(role)
        try:
            seconds, _micros = client.time()
            # touch.lua scores a member with Redis's time and answers it
            stamped = client.fcall(touch, 1, keys.GATEWAYS, b'{"member": "gw-clock"}')
        finally:
            client.close()
        assert seconds > 0 and float(stamped) >= seconds


def test_the_scheduler_may_inspect_streams_and_the_worker_claim_from_them(
    acl: AclRedis,
) -> None:
    stream = keys.stream("llama3:latest", keys.DEFAULT_PRIORITY)
    worker, scheduler = acl.client("worker"), acl.client("scheduler")
    try:
        worker.xgroup_create(stream, keys.GROUP, "0", mkstream=True)
        entry = worker.xadd(stream, {"id": "j1"})
        assert worker.xreadgroup(keys.GROUP, "node1", {stream: ">"})
        # A worker may take over entries (a node's stranded ones) ...
        assert worker.xautoclaim(stream, keys.GROUP, "node2", 0, justid=True) == [entry]
        assert worker.xclaim(stream, keys.GROUP, "node1", 0, [entry], justid=True) == [entry]
        # ... and the scheduler sees who holds what, and tidies up.
        assert scheduler.xinfo_groups(stream)[0]["pending"] == 1
        consumers = {c["name"]: c["pending"] for c in scheduler.xinfo_consumers(stream, keys.GROUP)}
        assert consumers == {b"node1": 1, b"node2": 0}
        assert scheduler.xpending_range(stream, keys.GROUP, "-", "+", 10)[0]["consumer"] == b"node1"
        assert scheduler.xgroup_delconsumer(stream, keys.GROUP, "node2") == 0
        assert scheduler.xack(stream, keys.GROUP, entry) == 1
        assert scheduler.xtrim(stream, minid="0-1", approximate=False) == 0
    finally:
        worker.close()
        scheduler.close()
    assert acl.denials() == []


def test_a_role_is_told_to_run_redis_setup_when_corrals_functions_are_missing(
    acl: AclRedis,
) -> None:
    admin, gateway = acl.client("admin"), acl.client("gateway")
    admin.function_delete(f"corral_{scripts.version()}")
    try:
        touch = scripts.SyncFunction(gateway, "touch")
        with pytest.raises(ResponseError, match="run `corral redis-setup`"):
            touch([keys.GATEWAYS], [b'{"member": "gw-x"}'])  # it may not load them itself
    finally:
        scripts.load_sync(admin)
        admin.close()
        gateway.close()
    assert [d["object"] for d in acl.denials()] == ["function|load"]
