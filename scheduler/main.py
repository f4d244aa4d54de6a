"""``corral scheduler``: maintenance for the whole fleet (run two for high availability)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from redis import Redis as SyncRedis

from corral import connections, logs, signals
from corral.children import Child
from corral.cli import run_command
from corral.scheduler import rq_worker
from corral.scheduler.daemon import Scheduler
from corral.settings import SchedulerSettings
from corral.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RQ_WORKER_GRACE = 10.0
"""Seconds the RQ worker has to finish its job in hand when the scheduler stops."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral scheduler", description=__doc__)
    SchedulerSettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    settings = SchedulerSettings.from_args(build_parser().parse_args(argv))
    logs.configure(settings.log_level, "scheduler")
    signals.run(lambda: serve(settings))
    return 0


async def serve(settings: SchedulerSettings) -> None:
    redis = connections.pooled(settings.redis_url, 8)
    rq_redis = SyncRedis.from_url(settings.redis_url)
    children: list[Child] = []
    supervisor = asyncio.create_task(supervise_rq_worker(settings, children))
    try:
        await connections.ping(redis)
        scheduler = Scheduler(settings, redis, rq_redis)
        with signals.graceful_signals(scheduler.request_stop):
            await scheduler.run()
    finally:
        await cancel_and_wait(supervisor)
        for child in children:
            await child.stop_async(RQ_WORKER_GRACE)  # RQ's warm shutdown: the job in hand ends
        rq_redis.close()
        await redis.aclose()


async def supervise_rq_worker(settings: SchedulerSettings, children: list[Child]) -> None:
    """Keep one RQ worker child alive: it exits on some Redis errors, and a dead one
    would leave retries waiting forever."""
    if not settings.rq_worker:
        return
    while True:
        if not children or not children[-1].alive:
            if children:
                log.warning("RQ worker exited (%s); starting a new one", children[-1].returncode)
                children.clear()
            children.append(await asyncio.to_thread(start_rq_worker, settings))
        await asyncio.sleep(max(settings.interval, 0.5))  # a supervision period


def start_rq_worker(settings: SchedulerSettings) -> Child:
    """The RQ worker that runs retry jobs, as a child (RQ wants the main thread's signals).

    It stays in our process group, as systemd's cgroup would keep it: a SIGKILL of the
    scheduler's group (a crash of its host, in the chaos run) takes it too.

    The Redis URL, password included, goes in its environment: on the command line any
    user of the host could read it with ``ps``.
    """
    command = [sys.executable, "-m", "corral.scheduler.rq_worker"]
    command += ["--log-level", settings.log_level]
    env = {**os.environ, rq_worker.REDIS_URL_ENV: settings.redis_url}
    return Child("rq-worker", command, own_session=False, env=env)


if __name__ == "__main__":
    raise SystemExit(run_command("scheduler", sys.argv[1:]))
