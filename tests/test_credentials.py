"""Redis passwords reach child processes by environment, never on their command line,
where any user of the host reads them with ``ps``."""

from __future__ import annotations

import secrets
from pathlib import Path

import redis as redis_sync
from rq import Worker

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
