"""The function RQ runs for a retry: put the job back in its stream, or dead-letter it.

It runs in an RQ worker (``corral.scheduler.rq_worker``), synchronously, on the connection RQ
gives it. Three cases, decided from the job record:

* ``retrying`` with attempts left and its deadline not passed: back into its priority
  stream, to be claimed like any new job;
* ``retrying`` with no attempts left: the job becomes ``dead`` and this function raises
  ``DeadLetter`` with the job's whole failure history, so RQ files it in its
  FailedJobRegistry — the dead-letter queue shown by rq-dashboard;
* ``dead``: an operator requeued it (rq-dashboard's *Requeue* or ``corral dlq retry``),
  so it goes back into the fleet with fresh attempts.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import get_current_job

from corral import keys, protocol
from corral.jobs import DOORBELL_CAP
from corral.scripts import Bury, Revive, SyncFunction, argv

DEAD_TTL = 7 * 86_400
"""Dead-letter record TTL (s) for an RQ job enqueued by a Corral that did not pass one."""


class DeadLetter(Exception):
    """Raised on purpose so RQ records the job as failed: it carries the failure history."""


def revive(
    job_id: str, max_attempts: int, job_ttl: int, result_ttl: int, dead_ttl: int = DEAD_TTL
) -> str:
    current = get_current_job()
    if current is None:
        raise RuntimeError("revive() must run inside an RQ worker")
    redis: Redis = current.connection
    fields = redis.hmget(
        keys.job(job_id),
        "state", "model", "prio", "attempts", "deadline", "history", "max_attempts", "last_error",
    )  # fmt: skip
    state, model, prio, attempts, deadline, history, limit, last_error = (_text(v) for v in fields)
    max_attempts = int(limit or max_attempts)  # the job's own limit, set at enqueue
    if state is None:
        return f"job {job_id} no longer exists (its record expired)"
    if state == "dead":
        return _requeue(redis, job_id, model, prio, ("retrying", "dead"), reset=True)
    if state != "retrying":
        return f"job {job_id} is {state}; nothing to retry"
    seconds, micros = redis.time()  # deadlines are on Redis's clock
    if deadline and 0 < float(deadline) < seconds + micros / 1e6:
        _bury(redis, job_id, "expired", "job deadline passed while it waited for a retry", 408,
              job_ttl, result_ttl, dead_ttl)  # fmt: skip
        return f"job {job_id} expired"
    if int(attempts or 0) >= max_attempts:
        message = f"gave up after {attempts} attempt(s)"
        if last_error:
            message += f"; the last failed with: {last_error}"
        _bury(redis, job_id, "dead", message, 503, job_ttl, result_ttl, dead_ttl)
        raise DeadLetter(f"job {job_id} ({model}) {message}; history:\n{history or ''}")
    return _requeue(redis, job_id, model, prio, ("retrying",), reset=False)


def _requeue(
    redis: Redis,
    job_id: str,
    model: str | None,
    prio: str | None,
    allowed: tuple[str, ...],
    *,
    reset: bool,
) -> str:
    assert model is not None
    priority = int(prio or keys.DEFAULT_PRIORITY)
    script = SyncFunction(redis, "revive")
    entry = script(
        keys=[
            keys.job(job_id),
            keys.stream(model, priority),
            keys.queued_count(model),
            keys.doorbell(model),
            keys.STATS,
            keys.MODELS,
            keys.RETRY_SCHEDULED,
        ],
        args=argv(
            Revive(
                group=keys.GROUP,
                doorbell_cap=DOORBELL_CAP,
                allowed=allowed,
                reset_attempts=reset,
            )
        ),
    )
    if not entry:
        return f"job {job_id} changed state meanwhile; not requeued"
    return f"job {job_id} requeued at priority {priority}"


def _bury(
    redis: Redis,
    job_id: str,
    state: str,
    error: str,
    status: int,
    job_ttl: int,
    result_ttl: int,
    dead_ttl: int,
) -> None:
    script = SyncFunction(redis, "bury")
    script(
        keys=[keys.job(job_id), keys.STATS, keys.RETRY_SCHEDULED],
        args=argv(
            Bury(
                expected="retrying",
                state=state,
                error=error,
                status=status,
                message=protocol.unsequenced_error(job_id, error, status).decode(),
                job_ttl=job_ttl,
                result_ttl=result_ttl,
                reply_prefix=keys.reply_channel(""),
                dead_ttl=dead_ttl,
            )
        ),
    )


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
