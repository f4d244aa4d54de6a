"""Jobs as they live in Redis, and every state transition on them.

A job record is a hash (``corral:job:<id>``) holding the request to send to Ollama,
the state, timestamps, the node of the attempt, the result or error. The priority
stream entry holds only the job id. Each transition is one Lua script (``corral/lua``)
so a job can never be both cancelled and run, or answered twice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from corral import keys, protocol
from corral.batching import ScriptBatcher
from corral.connections import text
from corral.errors import QueueFull, QuotaExceeded
from corral.keys import JobKind, JobState
from corral.scripts import (
    Cancel,
    Claim,
    Ending,
    Enqueue,
    Finish,
    Requeue,
    Retry,
    Scripts,
    argv,
)

ORPHANED = "orphaned: the gateway its client waited on stopped heartbeating"
"""The error of a job cancelled because nobody could receive its answer (status 503)."""

CLAIM_RECEIPT_TTL = 60
"""Seconds a claim's receipt is kept: far longer than any client re-sends a call."""

DOORBELL_CAP = 1024
"""A doorbell holds at most this many rings; more would only wake workers for nothing."""


def _ending(state: JobState, counter: str, error: str, status: int) -> Ending:
    reply = protocol.tail(protocol.ERROR, protocol.error_payload(error, status))
    return Ending(state.value, counter, error, status, reply.decode())


_EXPIRED_IN_QUEUE = _ending(
    JobState.EXPIRED, "expired", "job expired before a node could start it", 408
)
# 503, not 499: that client did not go away, and should try again.
_ORPHANED_IN_QUEUE = _ending(JobState.CANCELLED, "orphaned", ORPHANED, 503)


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(slots=True)
class JobSpec:
    """What a gateway enqueues."""

    kind: JobKind
    model: str
    request: bytes
    """The JSON body to send to Ollama's ``kind.path`` (already normalised)."""
    priority: int
    gateway_id: str
    stream: bool
    wait: bool = True
    wait_limit: float = 0.0
    """Seconds after enqueue (on Redis's clock) after which the job must not start (0: none)."""
    max_attempts: int = 3
    """Attempts the job may use on any path (retry, hand-back, reclaim) before it is dead."""
    run_timeout: float = 0.0
    """Seconds one attempt may run on a node before it is aborted (0: no limit)."""
    job_id: str = ""
    tenant: str = ""
    """Who the job's stored bytes are charged to (an opaque id, e.g. of its API key; '':
    nobody)."""
    quota: int = 0
    """Most bytes ``tenant`` may hold in Redis (0: no limit); enqueueing past it raises
    ``QuotaExceeded``."""
    degraded: str = ""
    """How the gateway degraded the request under load (the ``X-Corral-Degraded`` header,
    e.g. ``level=2; model=llama3:8b; num_predict=256``); empty when it was not."""
    owner: str = ""
    """The id of the API key that submitted it (empty when Corral is open): only that key
    (or an admin) may see or cancel it."""
    priority_asked: int | None = None
    """The priority the client asked for, when its class clamped it to ``priority``."""

    def __post_init__(self) -> None:
        if not self.job_id:
            self.job_id = new_job_id()


@dataclass(slots=True)
class ClaimedJob:
    """A job a worker has claimed and marked running."""

    job_id: str
    kind: JobKind
    model: str
    priority: int
    entry_id: str
    request: bytes
    stream: bool
    gateway_id: str
    attempt: int
    run_timeout: float = 0.0
    waited: float = 0.0
    """Seconds from enqueue to this claim, on Redis's clock."""

    @property
    def stream_key(self) -> str:
        return keys.stream(self.model, self.priority)


class JobStore:
    """Job transitions over one Redis client."""

    def __init__(
        self,
        redis: Redis,
        *,
        job_ttl: int,
        result_ttl: int,
        gateway_ttl: float = 30.0,
        clock: Callable[[], float] = time.time,
        resume_streams: bool = False,
    ) -> None:
        self.redis = redis
        self.resume_streams = resume_streams
        """Whether a job that already streamed part of its answer is put back (to be
        continued by the next node) rather than failed."""
        self.clock = clock
        """This process's clock: only for the informational times of history lines. Every
        comparison across hosts happens inside the scripts, on Redis's clock."""
        self.scripts = Scripts(redis)
        self.batch = ScriptBatcher(redis)
        self.job_ttl = job_ttl
        self.result_ttl = result_ttl
        self.gateway_ttl = gateway_ttl

    async def enqueue(self, spec: JobSpec, *, max_queue: int) -> int:
        """Store and queue the job in one step; returns the model's queued count.

        Raises ``QueueFull`` (nothing stored) when the model already has ``max_queue``.
        """
        named = Enqueue(
            group=keys.GROUP,
            max_queue=max_queue,
            doorbell_cap=DOORBELL_CAP,
            job_id=spec.job_id,
            model=spec.model,
            kind=spec.kind.value,
            priority=spec.priority,
            gateway_id=spec.gateway_id,
            stream=spec.stream,
            wait=spec.wait,
            wait_limit=spec.wait_limit,
            max_attempts=spec.max_attempts,
            run_timeout=spec.run_timeout,
            owner=spec.owner,
            priority_asked=spec.priority if spec.priority_asked is None else spec.priority_asked,
            tenant=spec.tenant,
            quota=spec.quota,
        )
        depth = await self.batch.call(
            self.scripts.enqueue,
            [
                keys.job(spec.job_id),
                keys.stream(spec.model, spec.priority),
                keys.queued_count(spec.model),
                keys.doorbell(spec.model),
                keys.STATS,
                keys.MODELS,
            ],
            argv(named, spec.request),
        )
        if int(depth) == -2:
            raise QuotaExceeded(
                f"storage quota exceeded: the jobs of this API key already hold up to "
                f"{spec.quota} bytes in the queue; wait for some to finish (or collect "
                f"their results) and try again"
            )
        if int(depth) < 0:
            raise QueueFull(
                f"server busy, please try again. {max_queue} requests already queued for "
                f'model "{spec.model}"',
                model=spec.model,
            )
        return int(depth)

    async def claim(self, model: str, consumer: str) -> ClaimedJob | None:
        """Claim the most urgent runnable job of ``model``, or None when none waits."""
        jobs = await self.claim_many(model, consumer, 1)
        return jobs[0] if jobs else None

    async def claim_many(self, model: str, consumer: str, limit: int) -> list[ClaimedJob]:
        """Claim up to ``limit`` runnable jobs of ``model`` in one round trip, most urgent
        first; an empty list when none waits."""
        jobs, _ = await self.claim_aged(model, consumer, limit)
        return jobs

    async def claim_aged(
        self, model: str, consumer: str, limit: int, min_age: float = 0.0
    ) -> tuple[list[ClaimedJob], float | None]:
        """As ``claim_many``, taking only jobs that have waited ``min_age`` seconds.

        Also returns, when a younger job was left, the seconds until it will have waited
        that long (None otherwise).
        """
        reply = await self.scripts.claim(
            keys=[
                *keys.streams(model),
                keys.queued_count(model),
                keys.doorbell(model),
                keys.STATS,
                keys.GATEWAYS,
                # A fresh receipt per call: redis-py re-sends this very call after a
                # timeout, and the script then answers with the jobs it took the first time.
                keys.claim_receipt(model, uuid.uuid4().hex),
            ],
            args=argv(self.claim_args(consumer, limit, min_age)),
        )
        rows = list(reply or ())
        defer: float | None = None
        if rows and rows[-1] and rows[-1][0] == b"defer":
            defer = int(rows.pop()[1]) / 1000
        jobs = [
            ClaimedJob(
                job_id=job_id.decode(),
                kind=JobKind(kind.decode()),
                model=model,
                priority=int(prio),
                entry_id=entry.decode(),
                request=request,
                stream=stream == b"1",
                gateway_id=gw.decode(),
                attempt=int(attempt),
                run_timeout=float(run_timeout or 0),
                waited=float(rest[0]) if rest else 0.0,
            )
            for prio, entry, job_id, kind, request, stream, gw, attempt, run_timeout, *rest in rows
        ]
        return jobs, defer

    def claim_args(self, consumer: str, want: int, min_age: float = 0.0) -> Claim:
        """The claim script's named arguments."""
        return Claim(
            group=keys.GROUP,
            consumer=consumer,
            want=want,
            receipt_ttl=CLAIM_RECEIPT_TTL,
            job_prefix=keys.job(""),
            reply_prefix=keys.reply_channel(""),
            ended_ttl=self.job_ttl,
            gateway_ttl=self.gateway_ttl,
            expired=_EXPIRED_IN_QUEUE,
            orphaned=_ORPHANED_IN_QUEUE,
            min_age=min_age,
        )

    async def finish(
        self,
        job: ClaimedJob,
        consumer: str,
        state: JobState,
        *,
        result: bytes = b"",
        error: str = "",
        status: int = 0,
        message: bytes = b"",
    ) -> bool:
        """Settle an attempt; False when the job had moved on (then nothing was published)."""
        named = Finish(
            group=keys.GROUP,
            node=consumer,
            entry=job.entry_id,
            state=state.value,
            error=error,
            status=status,
            job_ttl=self.job_ttl,
            result_ttl=self.result_ttl,
            reply_prefix=keys.reply_channel(""),
        )
        settled = await self.batch.call(
            self.scripts.finish,
            [keys.job(job.job_id), job.stream_key, keys.STATS, keys.output(job.job_id)],
            argv(named, result, message),
        )
        return bool(settled)

    async def requeue(
        self,
        job_id: str,
        model: str,
        priority: int,
        entry_id: str,
        consumer: str,
        reason: str,
        *,
        max_attempts: int = 0,
    ) -> int:
        """Put a job a node holds back in its queue at once (attempts stay counted).

        Returns 1 when requeued, 2 when failed instead (its client already had part of a
        streamed answer and ``resume_streams`` is off), 3 when sent to the retry inbox to
        be dead-lettered (it used its attempts: the record's own limit, or ``max_attempts``
        for a record without one), 0 when the job was no longer held by ``consumer``.
        """
        streamed = f"{reason} after part of the answer was streamed"
        named = Requeue(
            group=keys.GROUP,
            entry=entry_id,
            node=consumer,
            reason=reason,
            history=history_line(consumer, reason, 503, at=self.clock()),
            doorbell_cap=DOORBELL_CAP,
            max_attempts=max_attempts,
            streamed_error=streamed,
            streamed_status=503,
            streamed_message=protocol.unsequenced_error(job_id, streamed, 503).decode(),
            job_ttl=self.job_ttl,
            result_ttl=self.result_ttl,
            reply_prefix=keys.reply_channel(""),
            resume=self.resume_streams,
        )
        done = await self.scripts.requeue(
            keys=[
                keys.job(job_id),
                keys.stream(model, priority),
                keys.stream(model, priority),
                keys.queued_count(model),
                keys.doorbell(model),
                keys.STATS,
                keys.RETRY_INBOX,
            ],
            args=argv(named),
        )
        return int(done)

    async def retry(self, job: ClaimedJob, consumer: str, error: str, status: int) -> bool:
        """Hand a failed attempt to the scheduler for a retry with backoff (through RQ)."""
        named = Retry(
            group=keys.GROUP,
            node=consumer,
            entry=job.entry_id,
            error=error,
            history=history_line(consumer, error, status, job.attempt, at=self.clock()),
        )
        done = await self.scripts.retry(
            keys=[keys.job(job.job_id), job.stream_key, keys.RETRY_INBOX, keys.STATS],
            args=argv(named),
        )
        return bool(done)

    async def cancel(
        self,
        job_id: str,
        reason: str = "cancelled",
        *,
        expired: bool = False,
        status: int | None = None,
    ) -> JobState | None:
        """Cancel (or, past its time limit, expire) a job that has not finished.

        A queued job is then never run; a running one is aborted on its node. The status
        defaults to 499 (408 when expired). Returns the state the job was in (None: no
        such job).
        """
        state, default = (JobState.EXPIRED, 408) if expired else (JobState.CANCELLED, 499)
        status = default if status is None else status
        named = Cancel(
            job_id=job_id,
            token=uuid.uuid4().hex,  # the same call re-sent after a timeout answers alike
            state=state.value,
            reason=reason,
            status=status,
            message=protocol.unsequenced_error(job_id, reason, status).decode(),
            job_ttl=self.job_ttl,
            result_ttl=self.result_ttl,
            cancel_prefix=keys.cancel_channel(""),
            reply_prefix=keys.reply_channel(""),
            queue_prefix=keys.QUEUE_PREFIX,
        )
        prior = await self.scripts.cancel(keys=[keys.job(job_id), keys.STATS], args=argv(named))
        return JobState(prior.decode()) if prior else None

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record in API form (None when unknown or expired)."""
        raw = await self.redis.hgetall(keys.job(job_id))
        if not raw:
            return None
        return record_view({text(k): _bytes(v) for k, v in raw.items()})


def history_line(
    node: str, error: str, status: int, attempt: int | None = None, *, at: float
) -> str:
    """One line of a job's failure history (the record keeps them newline-separated).

    ``at`` is the writer's clock: shown to people, never compared."""
    entry: dict[str, Any] = {"at": at, "node": node, "error": error, "status": status}
    if attempt is not None:
        entry["attempt"] = attempt
    return orjson.dumps(entry).decode()


def record_view(rec: dict[str, bytes]) -> dict[str, Any]:
    """Decode a job hash into what ``GET /jobs/{id}`` shows."""

    def num(name: str) -> float | None:
        value = rec.get(name)
        return float(value) if value not in (None, b"", b"0.0") else None

    view: dict[str, Any] = {
        "id": rec.get("id", b"").decode(),
        "state": rec.get("state", b"").decode(),
        "kind": rec.get("kind", b"").decode(),
        "model": rec.get("model", b"").decode(),
        "priority": int(rec.get("prio", b"5")),
        "priority_asked": int(rec.get("prio_asked") or rec.get("prio", b"5")),
        "owner": rec.get("owner", b"").decode(),
        "attempts": int(rec.get("attempts", b"0")),
        "node": rec["node"].decode() if "node" in rec else None,
        "created_at": num("created"),
        "started_at": num("started"),
        "finished_at": num("finished"),
        "deadline": num("deadline"),
    }
    if "result" in rec:
        view["result"] = orjson.loads(rec["result"])
    if "error" in rec:
        view["error"] = rec["error"].decode()
        view["status"] = int(rec.get("status", b"500"))
    if "history" in rec:
        view["history"] = [orjson.loads(line) for line in rec["history"].splitlines() if line]
    return view


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value
