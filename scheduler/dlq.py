"""``corral dlq list|retry|purge``: the dead-letter queue from the terminal.

Dead letters are RQ retry jobs that failed for good, kept in RQ's FailedJobRegistry of
the ``corral-retry`` queue (the same ones rq-dashboard shows). ``retry`` requeues them
through RQ exactly as rq-dashboard's *Requeue* button does: the retry job runs again,
sees its Corral job dead, and sends it back into the fleet with fresh attempts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry

from corral import keys
from corral.rqjson import SERIALIZER
from corral.settings import ActionParser, CommonSettings


def build_parser() -> argparse.ArgumentParser:
    command = ActionParser("corral dlq", __doc__)
    listing = command.action("list", help="show dead-lettered jobs and why they died")
    listing.add_argument("--json", action="store_true")
    for name, text in (("retry", "send jobs back into the fleet"), ("purge", "forget jobs")):
        action = command.action(name, help=text)
        action.add_argument("ids", nargs="*", help="Corral job ids or RQ job ids")
        action.add_argument("--all", action="store_true", help="every dead-lettered job")
    return command.parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = CommonSettings.build(
        **({"redis_url": args.redis_url} if args.redis_url else {})
    ).redis_url
    connection = Redis.from_url(url)
    queue = Queue(keys.RETRY_QUEUE, connection=connection, serializer=SERIALIZER)
    registry = FailedJobRegistry(queue=queue)
    try:
        if args.action == "list":
            return _list(registry, args.json)
        chosen = _select(registry, args.ids, args.all)
        if chosen is None:
            return 2
        for rq_id in chosen:
            if args.action == "retry":
                registry.requeue(rq_id)
            else:
                _purge(registry, connection, rq_id)
            print(f"{args.action}: {rq_id}")
        return 0
    finally:
        connection.close()


def dead_letters(registry: FailedJobRegistry) -> list[dict[str, Any]]:
    letters = []
    for rq_id in registry.get_job_ids():
        try:
            job = Job.fetch(rq_id, connection=registry.connection, serializer=SERIALIZER)
        except NoSuchJobError:
            continue
        result = job.latest_result()
        reason = (result.exc_string if result is not None else "") or ""
        letters.append(
            {
                "rq_id": rq_id,
                "job": job.meta.get("corral_job"),
                "model": job.meta.get("model"),
                "attempts": job.meta.get("attempt"),
                "failed_at": job.ended_at.isoformat() if job.ended_at else None,
                "reason": reason.strip().splitlines()[-1] if reason.strip() else "",
            }
        )
    return letters


def _list(registry: FailedJobRegistry, as_json: bool) -> int:
    letters = dead_letters(registry)
    if as_json:
        print(json.dumps(letters, indent=2))
        return 0
    if not letters:
        print("the dead-letter queue is empty")
        return 0
    for letter in letters:
        job, model, attempts = letter["job"], letter["model"], letter["attempts"]
        print(f"{job}  {model}  attempts={attempts}  {letter['failed_at']}")
        print(f"    {letter['reason']}")
    return 0


def _select(registry: FailedJobRegistry, ids: list[str], every: bool) -> list[str] | None:
    letters = dead_letters(registry)
    if every:
        return [letter["rq_id"] for letter in letters]
    by_any = {letter["rq_id"]: letter["rq_id"] for letter in letters}
    by_any.update({str(letter["job"]): letter["rq_id"] for letter in letters})
    missing = [i for i in ids if i not in by_any]
    if missing or not ids:
        print(
            f"not in the dead-letter queue: {', '.join(missing) or '(no ids given)'}",
            file=sys.stderr,
        )
        return None
    return [by_any[i] for i in ids]


def _purge(registry: FailedJobRegistry, connection: Redis, rq_id: str) -> None:
    job = Job.fetch(rq_id, connection=connection, serializer=SERIALIZER)
    corral_job = job.meta.get("corral_job")
    registry.remove(job, delete_job=True)
    if corral_job:  # the record of a dead job is kept until purged; let it expire now
        connection.expire(keys.job(str(corral_job)), 60)
