"""The Lua scripts, loaded once per Redis client, and the named arguments of each.

Each script is one atomic job-state transition; its ``.lua`` file names its KEYS. Every
script starts with the same prelude, which reads the one clock Corral compares across
hosts: Redis's own ``TIME`` (``NOW`` as text with microseconds, ``NOWN`` as a number). No
script takes the caller's clock.

Calling convention (as BullMQ's scripts do): ``ARGV[1]`` is one JSON object of named
values, the dataclass below named for the script (the Lua reads ``a.job_id``), and a
script that stores or publishes a payload untouched (a request body, a result, the final
message) takes it raw in ``ARGV[2]`` (and ``ARGV[3]``). JSON, not msgpack: Redis's Lua
has both ``cjson`` and ``cmsgpack``, but the embedded Redis of ``make demo`` (fakeredis)
has only ``cjson``, and orjson, already a dependency, packs a dataclass in well under a
microsecond. Payloads stay out of the object because escaping and parsing them would
cost time in proportion to their size, on every request, for nothing.

No field is ever ``None``: ``null`` reaches Lua as ``cjson.null``, which is true.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

PRELUDE = """\
local _time = redis.call('TIME')
local NOW = string.format('%d.%06d', tonumber(_time[1]), tonumber(_time[2]))
local NOWN = tonumber(NOW)
"""


def source(name: str) -> str:
    """The text of ``corral/lua/<name>.lua``, after the clock prelude."""
    body = resources.files("corral").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return PRELUDE + body


def argv(named: object, *payloads: bytes) -> list[bytes]:
    """A script's ARGV: its named values (a dataclass below) as one JSON object, then
    its raw payloads."""
    return [orjson.dumps(named), *payloads]


class Scripts:
    """Registered scripts for one client; redis-py falls back from EVALSHA to EVAL itself."""

    def __init__(self, redis: Redis) -> None:
        self.enqueue: AsyncScript = redis.register_script(source("enqueue"))
        self.claim: AsyncScript = redis.register_script(source("claim"))
        self.finish: AsyncScript = redis.register_script(source("finish"))
        self.cancel: AsyncScript = redis.register_script(source("cancel"))
        self.requeue: AsyncScript = redis.register_script(source("requeue"))
        self.retry: AsyncScript = redis.register_script(source("retry"))


# -- the named arguments of each script (ARGV[1]) ---------------------------------------


@dataclass(slots=True, frozen=True)
class Enqueue:
    """``enqueue.lua``; ARGV[2] is the request body, stored as it is."""

    group: str
    max_queue: int
    """The queue is full (nothing stored) at this many queued jobs of the model."""
    doorbell_cap: int
    job_id: str
    model: str
    kind: str
    priority: int
    gateway_id: str
    stream: bool
    wait: bool
    """Whether a client waits on the gateway for the answer (orphan detection)."""
    wait_limit: float
    """Seconds the job may wait to start (0: no limit); the deadline is on Redis's clock."""
    max_attempts: int
    run_timeout: float
    """Seconds one attempt may run (0: no limit)."""
    owner: str = ""
    """The id of the API key that submitted the job (empty: Corral is open)."""
    priority_asked: int = 5
    """The priority the client asked for (``priority`` is what its class allowed)."""


@dataclass(slots=True, frozen=True)
class Ending:
    """How a claim ends a queued job that must not run, and what its gateway is told."""

    state: str
    counter: str
    """The stats counter to count it in."""
    error: str
    status: int
    reply: str
    """``protocol.tail(...)``: the script publishes the job id followed by this."""


@dataclass(slots=True, frozen=True)
class Claim:
    """``claim.lua``."""

    group: str
    consumer: str
    want: int
    """Most jobs to claim (the worker's free slots)."""
    receipt_ttl: int
    job_prefix: str
    reply_prefix: str
    ended_ttl: int
    """Record TTL (s) of a job that ends in the queue."""
    gateway_ttl: float
    """Seconds without a heartbeat after which a gateway is gone."""
    expired: Ending
    """For a job whose deadline passed while it waited."""
    orphaned: Ending
    """For a job whose client waits on a gateway that is gone."""
    min_age: float = 0.0
    """Claim only entries that have waited this many seconds (a node deferring to better
    placed nodes); 0 claims any."""


@dataclass(slots=True, frozen=True)
class Finish:
    """``finish.lua``; ARGV[2] is the result (may be empty), ARGV[3] the message to
    publish (may be empty)."""

    group: str
    node: str
    entry: str
    state: str
    error: str
    status: int
    job_ttl: int
    result_ttl: int
    """Record TTL (s) of a job a client waited on (its result was delivered live)."""
    reply_prefix: str


@dataclass(slots=True, frozen=True)
class Cancel:
    """``cancel.lua``."""

    job_id: str
    token: str
    """One per call: the same call re-sent answers what the first one found."""
    state: str
    """``cancelled`` or ``expired``."""
    reason: str
    status: int
    message: str
    """The whole message for the waiting gateway (``protocol.encode_error``)."""
    job_ttl: int
    result_ttl: int
    cancel_prefix: str
    reply_prefix: str


@dataclass(slots=True, frozen=True)
class Requeue:
    """``requeue.lua``."""

    group: str
    entry: str
    node: str
    """The node expected to hold the entry ('' for any)."""
    reason: str
    history: str
    """The failure-history line to append (JSON)."""
    doorbell_cap: int
    max_attempts: int
    """Attempt limit for a record that carries none (0: none)."""
    streamed_error: str
    """The error a job ends with when its client already had part of a streamed answer."""
    streamed_status: int
    streamed_message: str
    """That error's whole message for the waiting gateway."""
    job_ttl: int
    result_ttl: int
    reply_prefix: str
    resume: bool = False
    """Put a job that already streamed back too: the next node continues its answer."""


@dataclass(slots=True, frozen=True)
class Retry:
    """``retry.lua``."""

    group: str
    node: str
    entry: str
    error: str
    history: str


@dataclass(slots=True, frozen=True)
class Revive:
    """``revive.lua``."""

    group: str
    doorbell_cap: int
    allowed: tuple[str, ...]
    """States the job may be in (``retrying``; ``dead`` too for an operator's requeue)."""
    reset_attempts: bool


@dataclass(slots=True, frozen=True)
class Bury:
    """``bury.lua``."""

    expected: str
    """The state the job must still be in."""
    state: str
    """``dead`` or ``expired``."""
    error: str
    status: int
    message: str
    """The whole message for the waiting gateway."""
    job_ttl: int
    result_ttl: int
    reply_prefix: str


@dataclass(slots=True, frozen=True)
class Heartbeat:
    """``heartbeat.lua``; ARGV[2] is the node's record (a JSON object without ``ts``)."""

    node_id: str
    ttl_ms: int


@dataclass(slots=True, frozen=True)
class Touch:
    """``touch.lua``."""

    member: str


@dataclass(slots=True, frozen=True)
class Lease:
    """``lease_renew.lua`` and ``lease_release.lua``."""

    holder: str
    ttl_ms: int = 0
    """Only for a renewal."""


__all__ = [
    "Bury",
    "Cancel",
    "Claim",
    "Ending",
    "Enqueue",
    "Finish",
    "Heartbeat",
    "Lease",
    "Requeue",
    "Retry",
    "Revive",
    "Scripts",
    "Touch",
    "argv",
    "source",
]
