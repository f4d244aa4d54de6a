"""The Redis key schema and the job-state vocabulary: the one place names live.

Every process imports its key names from here, and the README documents the same
schema for ``redis-cli`` users. Queue keys carry a Redis Cluster hash tag on the
model (``{llama3:latest}``) so that one Lua script can touch all of a model's
priority streams, its queued counter and its doorbell.
"""

from __future__ import annotations

from enum import StrEnum

PREFIX = "corral"
GROUP = "corral"
"""The one consumer group on every priority stream."""

PRIORITIES = range(10)
"""0 is the most urgent, 9 the least; 5 is the default."""

DEFAULT_PRIORITY = 5


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    DEAD = "dead"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED, JobState.DEAD}
)


class JobKind(StrEnum):
    """What the worker asks its Ollama for; the gateway maps both API dialects onto these."""

    GENERATE = "generate"
    CHAT = "chat"
    EMBED = "embed"
    EMBEDDINGS = "embeddings"

    @property
    def path(self) -> str:
        return f"/api/{self.value}"

    @property
    def streams(self) -> bool:
        return self in (JobKind.GENERATE, JobKind.CHAT)


def stream(model: str, priority: int) -> str:
    """One stream per (model, priority); entries hold only the job id."""
    return f"{PREFIX}:q:{{{model}}}:p{priority}"


def streams(model: str) -> list[str]:
    return [stream(model, p) for p in PRIORITIES]


QUEUE_PREFIX = f"{PREFIX}:q:"
"""Every queue key starts so; a function composes ``queued_count`` from it and a model."""


def queued_count(model: str) -> str:
    """Jobs of this model enqueued and not yet claimed (drives the queue-full 503)."""
    return f"{PREFIX}:q:{{{model}}}:n"


def claim_receipt(model: str, token: str) -> str:
    """What one claim call took (job ids), kept a minute so a re-sent call gets the same jobs."""
    return f"{PREFIX}:q:{{{model}}}:claim:{token}"


def loading(model: str) -> str:
    """The node loading this model, set when it claims a job of it without having it
    loaded (expires): other nodes count that node as warm for the model (placement)."""
    return f"{PREFIX}:loading:{{{model}}}"


def doorbell(model: str) -> str:
    """A list a worker BLPOPs on; the enqueue script pushes one token per job."""
    return f"{PREFIX}:bell:{{{model}}}"


def job(job_id: str) -> str:
    """The job record (a hash): request payload, state, timestamps, result, history."""
    return f"{PREFIX}:job:{job_id}"


def output(job_id: str) -> str:
    """List of the reply messages of a streamed job, so lost pub/sub messages can be replayed."""
    return f"{PREFIX}:out:{job_id}"


TENANT_PREFIX = f"{PREFIX}:tenant:"
"""The stored-bytes accounting of one tenant (``corral.scripts.HELPERS``), hash-tagged on
the tenant: ``<prefix>{tenant}:bytes`` (string: the total), ``:held`` (hash: job key ->
bytes) and ``:until`` (sorted set: job key -> when its record expires, Redis time)."""


def tenant_bytes(tenant: str) -> str:
    """The bytes ``tenant`` holds in Redis now (the figure its quota is checked against)."""
    return f"{TENANT_PREFIX}{{{tenant}}}:bytes"


RETRY_INBOX = f"{PREFIX}:retry:inbox"
"""List of job ids waiting for the scheduler to schedule their retry (through RQ)."""

RETRY_PROCESSING = f"{RETRY_INBOX}:processing"
"""List: ids the active scheduler took from the retry inbox and is scheduling; a pass that
died midway leaves them here, and the next pass puts them back in the inbox."""

RETRY_SCHEDULED = f"{PREFIX}:retry:scheduled"
"""Sorted set: job ids whose retry is scheduled in RQ, scored by when it is due (Redis
time). The scheduler checks the overdue ones, so a retry whose RQ job was lost is
scheduled again; reviving or burying the job removes it."""

RETRY_QUEUE = "corral-retry"
"""The RQ queue of retry jobs; its FailedJobRegistry is the dead-letter queue."""


def reply_channel(gateway_id: str) -> str:
    """Pub/sub channel of one gateway process; messages are demultiplexed by job id."""
    return f"{PREFIX}:reply:{gateway_id}"


def cancel_channel(node_id: str) -> str:
    """Pub/sub channel a worker listens on for cancellations of jobs it runs."""
    return f"{PREFIX}:cancel:{node_id}"


NODES = f"{PREFIX}:nodes"
"""Sorted set: node id -> Redis time of its last heartbeat."""


def node(node_id: str) -> str:
    """JSON heartbeat record of one worker node, with a TTL of a few heartbeats."""
    return f"{PREFIX}:node:{node_id}"


def model_info(model: str) -> str:
    """Cached ``/api/show`` answer for a model, written by workers that serve it."""
    return f"{PREFIX}:show:{{{model}}}"


STATS = f"{PREFIX}:stats"
"""Hash of fleet-wide counters (enqueued, completed, failed, cancelled ...)."""

MODELS = f"{PREFIX}:models"
"""Set of every model a job was ever queued for: where the scheduler looks for streams."""

SCHEDULER_LEASE = f"{PREFIX}:scheduler:lease"
"""String: the id of the active scheduler, with a short TTL it keeps renewing."""

GATEWAYS = f"{PREFIX}:gateways"
"""Sorted set: gateway id -> Redis time of its last heartbeat (for orphan detection)."""

LOAD = f"{PREFIX}:load"
"""String (JSON, ``corral.load.LoadReport``): the degradation level and the figures behind
it (drain rate and queue ahead per model), written by the active scheduler each pass
with a TTL, so the level of a scheduler that stopped expires instead of lasting."""

# -- the shared response cache (L2). One hash tag for all of it: the write script keeps
# the byte count, the expiry index and the entries consistent in one step.

CACHE_TAG = f"{PREFIX}:cache:{{cache}}"

CACHE_INDEX = f"{CACHE_TAG}:index"
"""Sorted set: entry key -> when it expires (Redis time, ms); evictions take the lowest."""

CACHE_SIZES = f"{CACHE_TAG}:sizes"
"""Hash: entry key -> its size in bytes, as counted in ``CACHE_STATS`` ``bytes``."""

CACHE_STATS = f"{CACHE_TAG}:stats"
"""Hash: ``bytes`` (the entries' total size), ``evictions`` (entries evicted to stay
under CORRAL_CACHE_L2_BYTES) and ``writes`` (entries written)."""


def cache_entry(key: str) -> str:
    """One cached answer (a string with a TTL), by its canonical request hash."""
    return f"{CACHE_TAG}:e:{key}"


def cache_flight(key: str) -> str:
    """Single-flight lock: ``"<gateway id> <job id>"`` of the job that answers ``key``."""
    return f"{CACHE_TAG}:flight:{key}"


def cache_followed(key: str) -> str:
    """Set (with a short TTL, refreshed) while another gateway follows the flight's job."""
    return f"{CACHE_TAG}:followed:{key}"


def metric(name: str) -> str:
    """Hash of one metric's cumulative fleet-wide values (``corral.telemetry``)."""
    return f"{PREFIX}:metric:{name}"


def series(resolution: int, second: int) -> str:
    """Hash of what happened fleet-wide in one ``resolution``-second slot starting at
    ``second`` (Redis time), for the dashboard's graphs; expires after its retention."""
    return f"{PREFIX}:ts:{resolution}:{second}"


def sample_lock(second: int) -> str:
    """Taken (SET NX) by the one gateway that samples the fleet's gauges for that second."""
    return f"{PREFIX}:ts:sampled:{second}"


# -- tenants: API keys, their classes, rate limits and stored-bytes quotas
# (``corral.tenants``, ``corral.ratelimit``; stored bytes are ``tenant_bytes`` above).

API_KEYS = f"{PREFIX}:apikeys"
"""Hash: SHA-256 digest of a key (hex) -> the key's record (JSON, ``corral.tenants.ApiKey``);
the key itself is never stored."""

API_KEY_IDS = f"{PREFIX}:apikeys:ids"
"""Hash: key id -> the digest under which ``API_KEYS`` holds its record."""

KEY_CLASSES = f"{PREFIX}:keyclasses"
"""Hash: class name -> its limits (JSON, ``corral.tenants.KeyClass``)."""

RATE_TAG = f"{PREFIX}:rate:{{rate}}"
"""One hash tag for every rate limit, so one script checks a key's and its class's at once."""


def rate_log(subject: str, name: str, what: str) -> str:
    """Sorted set of one sliding window: member ``<id>:<cost>`` scored by its Redis time (ms).

    ``subject`` is ``key`` or ``class``, ``what`` is ``req`` or ``tok``."""
    return f"{RATE_TAG}:{subject}:{name}:{what}"


def rate_sum(subject: str, name: str, what: str) -> str:
    """String: the sum of the costs in the window ``rate_log`` holds."""
    return f"{rate_log(subject, name, what)}:sum"
