"""Which jobs each disruption of a chaos run hit, and which generations ran twice and why.

"Ran twice" comes from the fakes' own counters (``/_fake/runs``): a job whose generation
ran to completion (its ``done`` line went out) more than once, over all nodes. Each such
job is put in one of three buckets:

* ``streamed`` (allowed): its client had its first chunk before the disruption that hit
  it (the first one that overlaps the time between the job's first start and its second).
* ``worker_gone`` (allowed): the first completion went out on a node whose worker was
  SIGSTOPped at that moment, or SIGSTOPped or SIGKILLed within ``GONE_S`` after it, or
  SIGKILLed later but before the job started again while Redis was unavailable (stalled,
  refusing writes or restarting) all along since the completion, or back for less than
  ``RECORD_S``: no worker could record it, and running the job again is the recovery, not
  a fault.
* ``target``: every other one. The goal is none.

A disruption hits a job when their times overlap (the disruption's effects counted for
``LINGER`` seconds after it ends) and, for one tied to a node, the job started on that node;
``garbage`` hits exactly the jobs the node spoiled, and a worker kill or stop that could read
the jobs its worker held hits exactly those. A client error that no disruption overlapped is
listed with the last few disruptions before it: some effects last longer than any window
(a background loop that died on the error, say).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from faults import NODE_DISRUPTIONS, Disruption

LINGER = {
    "gateway_kill": 0.5,
    "pubsub_kill": 0.5,
    "redis_oom": 1.0,
    "redis_restart": 2.0,
    "scheduler_kill": 3.0,
    "slow_ps": 2.0,
}
"""Seconds after a disruption ends during which jobs it catches still count as hit: the
node TTL (2 s), the standby scheduler taking the lease (2 s), the retry backoff."""
DEFAULT_LINGER = 4.0
GONE_S = 0.5
RECORD_S = 2.5
"""After Redis comes back, how long a worker may take to record what it finished while
Redis was away: its writes back off up to 2 s between tries."""


@dataclass
class NodeRun:
    """One fake's counts for one request; times in seconds since the run began."""

    node: str
    started_at: list[float]
    completed_at: list[float]
    garbage_at: list[float]


def runs_by_prompt(raw: dict[str, list[dict[str, Any]]], t0: float) -> dict[str, list[NodeRun]]:
    """``/_fake/runs`` of every node, by prompt (chaos prompts are unique per job)."""
    out: dict[str, list[NodeRun]] = collections.defaultdict(list)
    rel = lambda times: [round(t - t0, 3) for t in times]  # noqa: E731
    for node, runs in raw.items():
        for run in runs:
            out[run["prompt"]].append(
                NodeRun(node, rel(run["started_at"]), rel(run["completed_at"]),
                        rel(run["garbage_at"]))
            )  # fmt: skip
    return out


@dataclass
class JobView:
    """What the report needs of one job: its client's times and the fakes' counts."""

    index: int
    job_id: str | None
    mode: str
    sent_at: float
    ended_at: float
    first_chunk_at: float | None
    runs: list[NodeRun]

    @staticmethod
    def starts_of(runs: list[NodeRun]) -> list[tuple[float, str]]:
        return sorted((t, r.node) for r in runs for t in r.started_at)

    @property
    def starts(self) -> list[tuple[float, str]]:
        return self.starts_of(self.runs)

    @property
    def completions(self) -> list[tuple[float, str]]:
        return sorted((t, r.node) for r in self.runs for t in r.completed_at)

    @property
    def spoiled(self) -> list[tuple[float, str]]:
        return sorted((t, r.node) for r in self.runs for t in r.garbage_at)

    def streamed_before(self, at: float) -> bool:
        return self.first_chunk_at is not None and self.first_chunk_at <= at


def hit_time(d: Disruption, job: JobView) -> float | None:
    """When ``d`` hit ``job`` (seconds since the run began), or None if it did not."""
    if d.kind == "garbage":
        window = (d.start, d.end + GONE_S)
        return next(
            (t for t, n in job.spoiled if n == d.node and window[0] <= t <= window[1]), None
        )
    if d.jobs is not None:  # what the killed or stopped worker held
        return d.start if job.job_id in d.jobs else None
    linger = LINGER.get(d.kind, DEFAULT_LINGER)
    if job.sent_at > d.end + linger or job.ended_at < d.start:
        return None
    if d.kind in NODE_DISRUPTIONS and d.node is not None:
        on_node = [t for t, node in job.starts if node == d.node and t <= d.end + linger]
        return max(d.start, on_node[0]) if on_node else None
    return max(d.start, job.sent_at)


def ran_twice(job: JobView, disruptions: list[Disruption]) -> tuple[str, str] | None:
    """(bucket, why) for a job that completed more than once, else None."""
    done = job.completions
    if len(done) < 2:
        return None
    starts = job.starts
    first, second = starts[0][0], starts[1][0] if len(starts) > 1 else done[1][0]
    at, node = done[0]
    where = ", ".join(f"{n} t={t:.2f}s" for t, n in done)
    for d in disruptions:
        if d.node != node:
            continue
        frozen = d.kind == "worker_stop" and d.start - GONE_S <= at <= d.end
        killed = d.kind == "worker_kill" and (
            abs(at - d.start) <= GONE_S
            or (at < d.start <= second and _redis_down_between(disruptions, at, d.start))
        )
        if frozen or killed:
            return "worker_gone", f"completed on {where}; the first during {node}'s {d.kind}"
    causes = []
    for d in disruptions:
        t = hit_time(d, job)
        if t is not None and t <= second and d.end + LINGER.get(d.kind, DEFAULT_LINGER) >= first:
            causes.append((t, d.kind))
    # A skewed clock lasts all run: it marks no moment. Without another cause, the job was
    # hit when it was taken back, i.e. when it started again.
    hit_at = min((t for t, kind in causes if kind != "clock_skew"), default=second)
    kinds = "+".join(sorted({k for _, k in causes})) or "no disruption found"
    chunk = "-" if job.first_chunk_at is None else f"{job.first_chunk_at:.2f}s"
    why = f"completed on {where}; hit by {kinds} at t={hit_at:.2f}s; first chunk to client {chunk}"
    return ("streamed" if job.streamed_before(hit_at) else "target"), why


REDIS_OUTAGES = ("redis_stall", "redis_oom", "redis_restart")


def _redis_down_between(disruptions: list[Disruption], start: float, end: float) -> bool:
    """Whether Redis was unavailable from ``start`` (within ``GONE_S``) until ``end``, or
    back for less than ``RECORD_S`` by then."""
    return any(
        d.kind in REDIS_OUTAGES and d.start <= start + GONE_S and d.end + RECORD_S >= end
        for d in disruptions
    )


@dataclass
class Row:
    injected: int = 0
    hit: int = 0
    bad: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class FaultReport:
    rows: dict[str, Row]
    ran_twice: dict[str, list[dict[str, Any]]]
    errors_by_fault: collections.Counter[str]
    garbage_unrecovered: list[dict[str, Any]]

    def lines(self) -> list[str]:
        out = [
            "per disruption (jobs hit; of those: lost, answered twice, wrong, ran twice "
            "[target / allowed], client errors):"
        ]
        for kind, row in self.rows.items():
            b = row.bad
            allowed = b["ran_twice_streamed"] + b["ran_twice_worker_gone"]
            out.append(
                f"  {kind:<15} injected {row.injected:>3}  hit {row.hit:>4}  lost {b['lost']}  "
                f"twice {b['answered_twice']}  wrong {b['wrong']}  "
                f"ran twice {b['ran_twice']}/{allowed}  errors {b['client_error']}"
            )
        out.append(
            "client errors by disruption: "
            + (", ".join(f"{k}={n}" for k, n in self.errors_by_fault.most_common()) or "none")
        )
        sizes = {k: len(v) for k, v in self.ran_twice.items()}
        out.append(
            f"ran twice (completed on a node more than once, from the fakes' counters): "
            f"{sizes['target']} not streamed when hit (target 0), "
            f"{sizes['streamed']} streamed before the hit (allowed), "
            f"{sizes['worker_gone']} first completion reached a stopped or killed worker "
            "(allowed)"
        )
        out.append(
            f"garbage jobs not streamed when spoiled that did not end done: "
            f"{len(self.garbage_unrecovered)}"
        )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "per_disruption": {
                k: {"injected": r.injected, "hit": r.hit, **r.bad} for k, r in self.rows.items()
            },
            "ran_twice": self.ran_twice,
            "client_errors_by_disruption": dict(self.errors_by_fault),
            "garbage_unrecovered": self.garbage_unrecovered,
        }


def build(
    jobs: list[JobView],
    disruptions: list[Disruption],
    injected: collections.Counter[str],
    enabled: list[str],
    bad: dict[int, set[str]],
    errors: dict[int, str],
    states: dict[int, str],
) -> FaultReport:
    """``bad``: index -> labels (lost, answered_twice, wrong); ``errors``: index -> the kind
    of client-visible error; ``states``: index -> final state of the job's record."""
    rows = {kind: Row(injected=injected.get(kind, 0)) for kind in enabled}
    twice: dict[str, list[dict[str, Any]]] = {"target": [], "streamed": [], "worker_gone": []}
    by_fault: collections.Counter[str] = collections.Counter()
    unrecovered = []
    for job in jobs:
        labels = set(bad.get(job.index, ()))
        found = ran_twice(job, disruptions)
        case = {"index": job.index, "job": job.job_id, "mode": job.mode}
        if found is not None:
            bucket, why = found
            twice[bucket].append({**case, "why": why})
            labels.add("ran_twice" if bucket == "target" else f"ran_twice_{bucket}")
        if job.index in errors:
            labels.add("client_error")
        kinds = sorted({d.kind for d in disruptions if hit_time(d, job) is not None})
        for kind in kinds:
            row = rows.setdefault(kind, Row(injected=injected.get(kind, 0)))
            row.hit += 1
            row.bad.update(labels)
        if job.index in errors:
            by_fault[f"{errors[job.index]} <- {'+'.join(kinds) or _after(job, disruptions)}"] += 1
        spoiled = job.spoiled
        state = states.get(job.index)
        if spoiled and not job.streamed_before(spoiled[0][0]) and state != "done":
            where = ", ".join(f"{n} t={t:.2f}s" for t, n in spoiled)
            unrecovered.append({**case, "why": f"spoiled on {where}; ended {state}"})
    for row in rows.values():
        row.bad = collections.Counter({k: n for k, n in row.bad.items() if n})
    return FaultReport(rows, twice, by_fault, unrecovered)


def _after(job: JobView, disruptions: list[Disruption]) -> str:
    """For an error no disruption overlapped: the last one-off disruption before it, whose
    effects may have lasted longer than LINGER (a loop that died, say)."""
    before = [d for d in disruptions if d.end <= job.sent_at and d.kind not in _BACKGROUND]
    if not before:
        return "none"
    return "none (after " + ", ".join(d.kind for d in before[-3:]) + ")"


_BACKGROUND = {"worker_kill", "clock_skew"}
