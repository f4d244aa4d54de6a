"""``corral scheduler``: maintenance for the whole fleet (run two for high availability)."""

from __future__ import annotations

import argparse

from corral import connections, logs, signals
from corral.settings import SchedulerSettings
from scheduler.daemon import Scheduler


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
    try:
        await connections.ping(redis)
        scheduler = Scheduler(settings, redis)
        with signals.graceful_signals(scheduler.request_stop):
            await scheduler.run()
    finally:
        await redis.aclose()


if __name__ == "__main__":
    raise SystemExit(main())
