"""The scheduler's RQ worker child: its Redis password comes by environment, never on
its command line (where any user of the host reads it with ``ps``), and it runs no code
that a writer of RQ's keys planted."""

from __future__ import annotations

import os
import pickle
import secrets
import zlib
from pathlib import Path

import redis as redis_sync
from rq import Queue, Worker
from rq.registry import FailedJobRegistry

from corral import keys
from corral.rqjson import SERIALIZER
from corral.scheduler.main import RQ_WORKER_GRACE, start_rq_worker
from corral.settings import SchedulerSettings
from corral.tooling.redis_proc import RedisProcess
from tests.helpers import until


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


async def test_the_scheduler_gives_its_rq_worker_the_password_by_environment() -> None:
    password = secrets.token_hex(16)
    server = RedisProcess(
        extra_args=["--requirepass", password], auth=("default", password)
    ).start()
    url = f"redis://:{password}@127.0.0.1:{server.port}/0"
    client = redis_sync.Redis.from_url(url)
    child = start_rq_worker(SchedulerSettings(redis_url=url))
    try:

        async def registered() -> int:
            return len(Worker.all(connection=client))

        await until(registered, 1, within=30)  # it connected with the password
        cmdline = _read(f"/proc/{child.pid}/cmdline")  # what `ps` shows
        assert password.encode() not in cmdline
        assert b"redis://" not in cmdline
        environ = _read(f"/proc/{child.pid}/environ").split(b"\0")
        assert f"CORRAL_REDIS_URL={url}".encode() in environ
    finally:
        await child.stop_async(RQ_WORKER_GRACE)
        client.close()
        server.stop()


class _Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


async def test_the_rq_worker_runs_no_code_that_a_writer_of_rq_keys_planted(
    redis_url: str, tmp_path: Path
) -> None:
    """Whoever can write ``rq:*`` can enqueue any job: a JSON job naming another function
    and a pickled job are both refused, and neither runs its command."""
    client = redis_sync.Redis.from_url(redis_url)
    named, pickled = tmp_path / "named", tmp_path / "pickled"
    as_json = Queue(keys.RETRY_QUEUE, connection=client, serializer=SERIALIZER)
    planted = as_json.enqueue("os.system", f"touch {named}")
    as_pickle = Queue(keys.RETRY_QUEUE, connection=client)  # RQ's default: pickle
    smuggled = as_pickle.enqueue("os.getcwd")
    client.hset(smuggled.key, "data", zlib.compress(pickle.dumps(_Evil(pickled))))
    child = start_rq_worker(SchedulerSettings(redis_url=redis_url))
    try:

        async def failed() -> set[str]:
            registry = FailedJobRegistry(queue=as_json)
            return set(registry.get_job_ids())

        await until(failed, {planted.id, smuggled.id}, within=30)
    finally:
        await child.stop_async(RQ_WORKER_GRACE)
        client.close()
    assert not named.exists() and not pickled.exists()
