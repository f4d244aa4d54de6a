"""``corral worker``: the daemon for one Ollama node (run it under systemd)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from corral import connections, logs, signals
from corral.cli import run_command
from corral.settings import WorkerSettings
from corral.worker.daemon import Worker
from corral.worker.metrics import HostMetrics
from corral.worker.ollama import OllamaClient


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral worker", description=__doc__)
    WorkerSettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    settings = WorkerSettings.from_args(build_parser().parse_args(argv))
    logs.configure(settings.log_level, f"worker[{settings.resolved_node_id()}]")
    signals.run(lambda: serve(settings))
    return 0


def build(settings: WorkerSettings, metrics: HostMetrics | None = None) -> Worker:
    """A worker with its own Redis and Ollama clients (closed by ``close(worker)``)."""
    ollama = OllamaClient(
        settings.ollama_url,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        slots=settings.resolved_slots(),
    )
    return Worker(
        settings,
        redis=connections.pooled(settings.redis_url, settings.redis_pool_size),
        bell=connections.blocking(settings.redis_url, settings.bell_timeout),
        pubsub=connections.subscriber(settings.redis_url),
        ollama=ollama,
        metrics=metrics,
    )


async def close(worker: Worker) -> None:
    await worker.ollama.aclose()
    for client in (worker.bell, worker.pubsub, worker.redis):
        with contextlib.suppress(*connections.TRANSIENT_REDIS_ERRORS):
            await client.aclose()


async def serve(settings: WorkerSettings) -> None:
    metrics = HostMetrics()
    worker = build(settings, metrics)
    try:
        await connections.ping(worker.redis)
        with signals.graceful_signals(worker.request_stop):
            await worker.run()
    finally:
        metrics.close()
        await close(worker)


if __name__ == "__main__":
    raise SystemExit(run_command("worker", sys.argv[1:]))
