"""Corral's Lua, loaded into Redis as one Functions library, and the named arguments of
each function.

Each function is one atomic job-state transition; its ``corral/lua/<name>.lua`` file
names its KEYS. The library is loaded with ``FUNCTION LOAD`` by an admin step
(``corral redis-setup``), or by the first call of a client allowed to load it (tests,
``make demo``): the shipped ACL lets Corral's roles ``FCALL`` and nothing else of the
scripting commands, so a stolen role password cannot run arbitrary Lua (``EVAL``) in
Redis. Library and function names carry a hash of the library's text, so two versions
of Corral can share a Redis during a rolling upgrade, each calling its own functions.

Every function starts with the same prelude, which reads the one clock Corral compares
across hosts: Redis's own ``TIME`` (``NOW`` as text with microseconds, ``NOWN`` as a
number). No function takes the caller's clock. The library also defines the tenant
accounting every function that stores or drops a request uses (``HOLD``, ``SWEEP``).

Calling convention (as BullMQ's scripts do): ``ARGV[1]`` is one JSON object of named
values, the dataclass below named for the function (the Lua reads ``a.job_id``), and a
function that stores or publishes a payload untouched (a request body, a result, the
final message) takes it raw in ``ARGV[2]`` (and ``ARGV[3]``). JSON, not msgpack:
Redis's Lua has both ``cjson`` and ``cmsgpack``, but the embedded Redis of ``make
demo`` (fakeredis) has only ``cjson``, and orjson, already a dependency, packs a
dataclass in well under a microsecond. Payloads stay out of the object because escaping
and parsing them would cost time in proportion to their size, on every request, for
nothing.

No field is ever ``None``: ``null`` reaches Lua as ``cjson.null``, which is true.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from corral import keys

log = logging.getLogger(__name__)

NAMES = (
    "bury",
    "cache_put",
    "cancel",
    "claim",
    "enqueue",
    "finish",
    "heartbeat",
    "lease_release",
    "lease_renew",
    "ratelimit",
    "ratelimit_settle",
    "requeue",
    "retry",
    "revive",
    "touch",
)
"""Every ``corral/lua/<name>.lua``: one function of the library each."""

ALLOW_OOM = frozenset({"claim", "finish", "requeue", "retry", "lease_renew", "lease_release"})
"""Functions that run while Redis is at ``maxmemory`` (the ``allow-oom`` flag).

Redis refuses any other function outright at ``maxmemory``. These settle or hand back
work already accepted (a refused ``finish`` is a completed generation that may run again
if its worker dies before Redis has room), claim it, or keep the scheduler's lease; each
starts with a write Redis allows at ``maxmemory`` (``XACK``, ``XREADGROUP``,
``PEXPIRE``, ``DEL``), which is what let them run there as plain scripts. New work
(``enqueue``), heartbeats and cache writes stay refused."""

PRELUDE = """\
  local _time = redis.call('TIME')
  local NOW = string.format('%d.%06d', tonumber(_time[1]), tonumber(_time[2]))
  local NOWN = tonumber(NOW)
"""

TENANT_KEY_TTL = 86_400
"""Seconds a tenant's accounting keys outlive its last change."""

HELPERS = """\
-- Bytes a tenant holds in Redis: {tenant}:bytes (the total), {tenant}:held (job key ->
-- bytes) and {tenant}:until (job key -> when its record expires; +inf while it lives).
local function tenant_keys(tenant)
  local base = '%(prefix)s{' .. tenant .. '}'
  return base .. ':held', base .. ':until', base .. ':bytes'
end

-- Charge `bytes` held by the record `job_key` to `tenant` until `expires` (Redis time;
-- 0: while the job lives); 0 bytes releases the charge. A tenant of '' is not counted.
local function HOLD(tenant, job_key, bytes, expires)
  if not tenant or tenant == '' then
    return
  end
  local held, untl, total = tenant_keys(tenant)
  local old = tonumber(redis.call('HGET', held, job_key) or '0')
  if bytes > 0 then
    redis.call('HSET', held, job_key, bytes)
    redis.call('ZADD', untl, expires > 0 and expires or '+inf', job_key)
  else
    redis.call('HDEL', held, job_key)
    redis.call('ZREM', untl, job_key)
  end
  if bytes ~= old then
    if redis.call('INCRBY', total, bytes - old) < 0 then
      redis.call('SET', total, 0) -- its keys expired while one of its jobs lived
    end
  end
  redis.call('EXPIRE', held, %(ttl)d)
  redis.call('EXPIRE', untl, %(ttl)d)
  redis.call('EXPIRE', total, %(ttl)d)
end

-- Release what expired records of `tenant` held (a record's expiry runs no script);
-- returns the bytes the tenant holds now.
local function SWEEP(tenant, now)
  local held, untl, total = tenant_keys(tenant)
  for _, job_key in ipairs(redis.call('ZRANGEBYSCORE', untl, '-inf', now, 'LIMIT', 0, 256)) do
    HOLD(tenant, job_key, 0, 0)
  end
  return tonumber(redis.call('GET', total) or '0')
end
"""


def source(name: str) -> str:
    """The text of ``corral/lua/<name>.lua``."""
    return resources.files("corral").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def _body(version: str) -> str:
    parts = [HELPERS % {"prefix": keys.TENANT_PREFIX, "ttl": TENANT_KEY_TTL}]
    for name in NAMES:
        flags = "{'allow-oom'}" if name in ALLOW_OOM else "{}"
        parts.append(
            f"local function {name}(KEYS, ARGV)\n{PRELUDE}{source(name)}\nend\n"
            f"redis.register_function{{function_name='{function_name(name, version)}', "
            f"callback={name}, flags={flags}}}\n"
        )
    return "\n".join(parts)


@cache
def version() -> str:
    """A hash of the library's text: part of every name in it."""
    return hashlib.sha256(_body("").encode()).hexdigest()[:12]


def function_name(name: str, version_: str | None = None) -> str:
    return f"corral_{version() if version_ is None else version_}_{name}"


@cache
def library() -> str:
    """The library's text, as ``FUNCTION LOAD`` takes it."""
    return f"#!lua name=corral_{version()}\n{_body(version())}"


def is_missing(exc: object) -> bool:
    """Whether ``exc`` is Redis saying the function is not loaded."""
    return isinstance(exc, ResponseError) and "function not found" in str(exc).lower()


def _load_failed(exc: ResponseError) -> ResponseError:
    return ResponseError(
        f"Corral's Redis functions (library corral_{version()}) are not loaded and this "
        f"client may not load them ({exc}); run `corral redis-setup` as the Redis admin"
    )


async def load(redis: Redis) -> None:
    """Load this version's library (replacing the same version's, which is identical)."""
    await redis.function_load(library(), replace=True)


def load_sync(redis: SyncRedis) -> None:
    redis.function_load(library(), replace=True)


def argv(named: object, *payloads: bytes) -> list[bytes]:
    """A function's ARGV: its named values (a dataclass below) as one JSON object, then
    its raw payloads."""
    return [orjson.dumps(named), *payloads]


class Function:
    """One function of the library, called over an asyncio client. A Redis that lacks the
    library (a fresh or restarted one without persistence) gets it loaded on the first
    call, when this client may load it."""

    def __init__(self, redis: Redis, name: str) -> None:
        self.redis = redis
        self.name = function_name(name)

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self.redis.fcall(self.name, len(keys), *keys, *args)
        except ResponseError as exc:
            if not is_missing(exc):
                raise
        try:
            await load(self.redis)
        except ResponseError as exc:
            raise _load_failed(exc) from exc
        log.info("loaded Redis function library corral_%s", version())
        return await self.redis.fcall(self.name, len(keys), *keys, *args)


class SyncFunction:
    """:class:`Function` over a blocking client (the scheduler's RQ jobs)."""

    def __init__(self, redis: SyncRedis, name: str) -> None:
        self.redis = redis
        self.name = function_name(name)

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return self.redis.fcall(self.name, len(keys), *keys, *args)
        except ResponseError as exc:
            if not is_missing(exc):
                raise
        try:
            load_sync(self.redis)
        except ResponseError as exc:
            raise _load_failed(exc) from exc
        return self.redis.fcall(self.name, len(keys), *keys, *args)


class Scripts:
    """The job-state functions for one client."""

    def __init__(self, redis: Redis) -> None:
        self.enqueue = Function(redis, "enqueue")
        self.claim = Function(redis, "claim")
        self.finish = Function(redis, "finish")
        self.cancel = Function(redis, "cancel")
        self.requeue = Function(redis, "requeue")
        self.retry = Function(redis, "retry")


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
    tenant: str = ""
    """Who the stored bytes are charged to ('' : nobody)."""
    quota: int = 0
    """Most bytes the tenant may hold in Redis (0: no limit); over it nothing is stored."""


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
    queue_prefix: str
    """``keys.QUEUE_PREFIX``: the function composes the job's queued-count key from it."""


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
    dead_ttl: int = 7 * 86_400
    """Record TTL (s) of a dead letter."""


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
    "Function",
    "Heartbeat",
    "Lease",
    "Requeue",
    "Retry",
    "Revive",
    "Scripts",
    "SyncFunction",
    "Touch",
    "argv",
    "function_name",
    "is_missing",
    "library",
    "load",
    "load_sync",
    "source",
    "version",
]
