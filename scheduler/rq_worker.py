"""The RQ worker that runs retry jobs (``python -m corral.scheduler.rq_worker``).

``corral scheduler`` starts one as a child process and stops it with SIGTERM (RQ's warm
shutdown: the job in hand finishes first). It runs without RQ's own scheduler: the active
``corral scheduler`` moves retries whose backoff has passed onto the queue itself. It
reads its Redis URL from ``CORRAL_REDIS_URL`` only: a password on the command line would
be visible to every user of the host in ``ps``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker

from corral import keys
from corral.rqjson import SERIALIZER, CorralJob

REDIS_URL_ENV = "CORRAL_REDIS_URL"


class _Connection(Redis):
    """fakeredis (``make demo``'s Redis where no redis-server is installed) answers
    CLIENT INFO in a shape redis-py cannot parse; RQ only wants the address from it."""

    def client_info(self, **kwargs: Any) -> Any:
        try:
            return super().client_info(**kwargs)
        except ValueError:
            return {"addr": "unknown"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m corral.scheduler.rq_worker", description=__doc__
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        print(f"rq_worker: {REDIS_URL_ENV} is not set", file=sys.stderr)
        return 2
    connection = _Connection.from_url(url)
    queue = Queue(
        keys.RETRY_QUEUE, connection=connection, serializer=SERIALIZER, job_class=CorralJob
    )
    worker = SimpleWorker(
        [queue], connection=connection, serializer=SERIALIZER, job_class=CorralJob
    )
    worker.work(with_scheduler=False, logging_level=args.log_level.upper())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
