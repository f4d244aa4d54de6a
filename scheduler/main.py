"""``corral scheduler``: maintenance for the whole fleet (run two for high availability)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys

from redis import Redis as SyncRedis

from corral import connections, logs, signals
from corral.cli import run_command
from corral.scheduler.daemon import Scheduler
from corral.settings import SchedulerSettings
from corral.tasks import cancel_and_wait

log = logging.getLogger(__name__)


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
    children: list[subprocess.Popen[bytes]] = []
    supervisor = asyncio.create_task(supervise_rq_worker(settings, children))
    try:
        await connections.ping(redis)
        scheduler = Scheduler(settings, redis, rq_redis)
        with signals.graceful_signals(scheduler.request_stop):
            await scheduler.run()
    finally:
        await cancel_and_wait(supervisor)
        for child in children:
            await stop_child(child)
        rq_redis.close()
        await redis.aclose()


async def supervise_rq_worker(
    settings: SchedulerSettings, children: list[subprocess.Popen[bytes]]
) -> None:
    """Keep one RQ worker child alive: it exits on some Redis errors, and a dead one
    would leave retries waiting forever."""
    if not settings.rq_worker:
        return
    while True:
        if not children or children[-1].poll() is not None:
            if children:
                log.warning("RQ worker exited (%s); starting a new one", children[-1].returncode)
                children.clear()
            children.append(start_rq_worker(settings))
        await asyncio.sleep(max(settings.interval, 0.5))  # a supervision period


def start_rq_worker(settings: SchedulerSettings) -> subprocess.Popen[bytes]:
    """The RQ worker that runs retry jobs, as a child (RQ wants the main thread's signals)."""
    command = [
        sys.executable,
        "-m",
        "corral.scheduler.rq_worker",
        "--redis-url",
        settings.redis_url,
    ]
    return subprocess.Popen([*command, "--log-level", settings.log_level])


async def stop_child(child: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    child.terminate()  # RQ's warm shutdown: finish the job in hand
    try:
        await asyncio.to_thread(child.wait, grace)
    except subprocess.TimeoutExpired:
        child.kill()
        await asyncio.to_thread(child.wait)


if __name__ == "__main__":
    raise SystemExit(run_command("scheduler", sys.argv[1:]))
