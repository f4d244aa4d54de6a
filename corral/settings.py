"""Typed settings, one object per process, built at the entry point and passed down.

Every field is an environment variable with the ``CORRAL_`` prefix and a command-line
flag of the same name (``redis_url`` is ``CORRAL_REDIS_URL`` and ``--redis-url``), except
the secrets in ``NO_FLAG``. Flags win over the environment, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import uuid
from typing import Any, Self

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from corral.errors import ConfigError
from corral.names import normalize_model

_PLACEHOLDER_KEYS = {"changeme", "change-me", "secret", "example"}


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis to meet in")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    node_ttl: float = Field(
        6.0, gt=0, description="seconds without a heartbeat before a node counts as dead"
    )
    gateway_ttl: float = Field(
        30.0,
        gt=0,
        description="seconds without a heartbeat before a gateway counts as gone "
        "(its waiting clients' jobs are then cancelled as orphans)",
    )
    job_ttl: int = Field(
        3600, gt=0, description="seconds the record and result of a wait=false job is kept"
    )
    result_ttl: int = Field(
        60, gt=0, description="seconds the record of a job whose client waited for it is kept"
    )
    dead_ttl: int = Field(
        7 * 86_400,
        gt=0,
        description="seconds a dead-lettered job's record (with its request, for a requeue) "
        "is kept",
    )
    redis_pool_size: int = Field(
        48, ge=2, description="Redis connections per process (a blocking pool)"
    )
    resume_streams: bool = Field(
        True,
        description="when a node dies (or its Ollama fails) in the middle of a streamed "
        "answer, another node continues it from where the client is (worker and scheduler)",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="attempts a job gets before it is dead-lettered (written into each job "
        "by the gateway; the scheduler's applies to jobs that carry none)",
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field, with the env variable and default in its help."""
        for name, field in cls.model_fields.items():
            if name in NO_FLAG:
                continue
            flag = "--" + name.replace("_", "-")
            help_ = (
                f"{field.description or ''} (env CORRAL_{name.upper()}, default {field.default!r})"
            )
            kind = _flag_type(field.annotation)
            if kind is bool:
                parser.add_argument(
                    flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_
                )
            else:
                parser.add_argument(flag, dest=name, default=None, type=kind, help=help_)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Self:
        given = {k: v for k, v in vars(ns).items() if k in cls.model_fields and v is not None}
        return cls.build(**given)

    @classmethod
    def build(cls, **given: Any) -> Self:
        """The settings from ``given`` (flags), the environment and the defaults; a
        ``ConfigError`` with one line per bad setting otherwise."""
        try:
            return cls(**given)
        except ValidationError as exc:
            raise ConfigError(*(_problem(error) for error in exc.errors())) from None


SECRET_FIELDS = frozenset({"api_keys", "redis_url"})
"""Settings whose values are never printed (keys, and URLs that may hold a password)."""

NO_FLAG = frozenset({"api_keys"})
"""Settings taken only from the environment: a flag's value is visible to anyone who can
list processes (``ps``)."""


def _problem(error: Any) -> str:
    """One line for one invalid setting: its variable, its flag, what is wrong, what it got."""
    loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    name = loc[0] if loc else ""
    where = f"CORRAL_{name.upper()} (--{name.replace('_', '-')})" if name else "settings"
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    # A check of the whole object (no field name) gets every setting as its input.
    if not name or name in SECRET_FIELDS or "input" not in error:
        return f"{where}: {message}"
    return f"{where}: {message} (got {error['input']!r})"


class ActionParser:
    """A command made of actions (``corral keys add``, ``corral dlq list``) whose
    ``--redis-url`` is accepted before the action and after it."""

    def __init__(self, prog: str, description: str | None) -> None:
        self.parser = argparse.ArgumentParser(prog=prog, description=description)
        self.parser.add_argument("--redis-url", default=None, help=_REDIS_URL_HELP)
        # After the action: SUPPRESS leaves the value given before it, if any, in place.
        self._common = argparse.ArgumentParser(add_help=False)
        self._common.add_argument("--redis-url", default=argparse.SUPPRESS, help=_REDIS_URL_HELP)
        self._actions = self.parser.add_subparsers(dest="action", required=True)

    def action(self, name: str, help: str) -> argparse.ArgumentParser:
        return self._actions.add_parser(name, parents=[self._common], help=help)


_REDIS_URL_HELP = "default: CORRAL_REDIS_URL"


def _flag_type(annotation: Any) -> Any:
    if annotation in (int, float, bool):
        return annotation
    return str


class GatewaySettings(CommonSettings):
    host: str = Field("127.0.0.1", description="address the gateway listens on")
    port: int = Field(
        11434, ge=0, le=65535, description="port (Ollama's, so clients need no change)"
    )
    gateway_id: str = Field(
        "", description="unique id of this gateway process (default: host-pid-random)"
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="largest request body accepted (413 beyond)"
    )
    max_queue: int = Field(10_000, gt=0, description="queued jobs per model before 503")
    default_priority: int = Field(5, ge=0, le=9, description="priority when a request names none")
    request_timeout: float = Field(
        600.0, gt=0, description="seconds a client waits for its job before a 504"
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="bootstrap keys (environment only, never a flag): comma-separated, each "
        "optionally KEY:PRIORITY, each with every scope; with none here and none stored "
        "(corral keys) the gateway is open",
    )
    auth_cache_ttl: float = Field(
        5.0,
        ge=0,
        description="seconds a gateway remembers a key it looked up in Redis (a revoked key "
        "works at most this long on a gateway that saw it)",
    )
    auth_fail_limit: int = Field(
        20,
        ge=0,
        description="failed authentications per client address per minute before that "
        "address gets 429s (per gateway process; 0: no limit)",
    )
    token_charge_default: int = Field(
        1024,
        ge=0,
        description="tokens charged to a tokens-per-minute limit for a generation that "
        "names no num_predict and whose class has no ceiling",
    )
    audit_log: str = Field(
        "",
        description="where the audit log goes, one JSON line per decision: a file path, "
        "'-' for standard error, empty for nowhere",
    )
    cors_origins: str = Field(
        "",
        description="comma-separated origins browsers may call the gateway from ('*' for "
        "any); empty = CORS off",
    )
    fleet_refresh: float = Field(
        1.0, gt=0, description="seconds between reads of the node registry"
    )
    model_grace: float = Field(
        60.0,
        ge=0,
        description="seconds a model stays routable after the last node serving it was seen "
        "(its jobs wait in the queue rather than 404 while a node restarts or Redis stalls)",
    )
    run_timeout: float = Field(
        1800.0,
        gt=0,
        description="seconds one attempt of a job may run on a node before it is aborted "
        "and failed (X-Corral-Run-Timeout or the job API's run_timeout may ask for another)",
    )
    run_timeout_max: float = Field(
        7200.0, gt=0, description="the longest run time a request may ask for"
    )
    workers: int = Field(1, ge=1, description="gateway processes (uvicorn workers)")
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a client may take to send a request's headers (408)"
    )
    body_timeout: float = Field(
        60.0, gt=0, description="seconds a client may take to send a request's body (408)"
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="largest request head (request line and headers; 431)"
    )
    max_headers: int = Field(100, ge=10, description="most header lines in a request (431)")
    max_connections: int = Field(
        4096, ge=1, description="open client connections per gateway process (503 beyond)"
    )
    max_queue_total: int = Field(
        50_000,
        gt=0,
        description="queued jobs across every model before 503 (as last measured by the "
        "scheduler, so it may be passed by what arrives within one pass)",
    )
    degrade_num_predict: int = Field(
        256, gt=0, description="at level 1 and above: the num_predict cap for degradable priorities"
    )
    degrade_cap_priority: int = Field(
        3,
        ge=0,
        le=9,
        description="at level 1 and above, num_predict is capped for this priority and "
        "less urgent ones (higher numbers)",
    )
    degrade_models: str = Field(
        "",
        description="at level 2 and above: comma-separated HEAVY=LIGHT model pairs "
        "(e.g. llama3:70b=llama3:8b) routed to the light model for degradable priorities",
    )
    degrade_map_priority: int = Field(
        5,
        ge=0,
        le=9,
        description="at level 2 and above, heavy models are mapped for this priority and "
        "less urgent ones",
    )
    shed_priority: int = Field(
        7,
        ge=0,
        le=9,
        description="at level 3, requests of this priority and less urgent ones are refused "
        "(503, 429 on /v1) with a Retry-After from the measured drain rate",
    )
    retry_after_max: float = Field(
        600.0, gt=0, description="the longest Retry-After any refusal suggests"
    )
    cache: bool = Field(
        True,
        description="shared response cache with single-flight for generate and chat "
        "(deterministic requests only unless cache_widen)",
    )
    cache_widen: bool = Field(
        False,
        description="also cache generations that are not deterministic (no temperature 0 "
        "and no fixed seed)",
    )
    cache_widen_level: int = Field(
        0,
        ge=0,
        le=3,
        description="from this degradation level on, cache and share generations that are "
        "not deterministic too (0: never; 2 is the original design's, but it adds a cache "
        "lookup and a lock in Redis to every such request while the fleet is overloaded)",
    )
    cache_ttl: float = Field(3600.0, gt=0, description="seconds a cached answer is kept in Redis")
    cache_ttl_degraded: float = Field(
        14400.0,
        gt=0,
        description="seconds a cached answer is kept when written at degradation level 1 or more",
    )
    cache_l1_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="bytes of cached answers each gateway process keeps in memory (L1, LRU; "
        "0 turns L1 off)",
    )
    cache_l1_ttl: float = Field(
        300.0, gt=0, description="seconds an answer stays in a gateway's in-memory L1"
    )
    cache_l2_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="bytes of cached answers kept in Redis (L2) fleet-wide; the entries "
        "closest to expiry are evicted first beyond it",
    )
    cache_entry_max_bytes: int = Field(
        1024 * 1024, gt=0, description="largest answer cached (bytes); bigger ones are not"
    )
    cache_lookup_timeout: float = Field(
        0.05,
        gt=0,
        description="seconds a cache lookup in Redis may take before it counts as a miss",
    )
    cache_flight_ttl: float = Field(
        5.0,
        gt=0,
        description="seconds a single-flight lock outlives its gateway (renewed while the "
        "job runs; followers elsewhere run their own job once it lapses)",
    )
    cache_follow_poll: float = Field(
        0.05,
        gt=0,
        description="longest pause between two reads of a shared job's output by a gateway "
        "whose requests follow a job another gateway runs",
    )

    tenant_quota_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="bytes the jobs of one API key may hold in Redis (request bodies of live "
        "jobs, results of finished wait=false jobs); new work past it gets a 429 (0: no limit)",
    )
    redis_memory_limit: float = Field(
        0.9,
        ge=0,
        le=1,
        description="share of Redis's maxmemory in use at which new work is refused with a "
        "503, before Redis refuses writes (read every fleet refresh; 0: never)",
    )

    def resolved_gateway_id(self) -> str:
        return self.gateway_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    @field_validator("api_keys")
    @classmethod
    def _no_placeholder_keys(cls, value: SecretStr) -> SecretStr:
        for number, key in enumerate(parse_api_keys(value.get_secret_value()), start=1):
            if key.lower() in _PLACEHOLDER_KEYS:  # the message never holds the key
                raise ValueError(f"key number {number} is a placeholder; choose a real key")
        return value

    def key_priorities(self) -> dict[str, int | None]:
        return parse_api_keys(self.api_keys.get_secret_value())

    def cors_origin_list(self) -> list[str]:
        return [part.strip() for part in self.cors_origins.split(",") if part.strip()]

    @field_validator("degrade_models")
    @classmethod
    def _model_pairs(cls, value: str) -> str:
        parse_model_map(value)
        return value

    def model_map(self) -> dict[str, str]:
        return parse_model_map(self.degrade_models)


def parse_model_map(spec: str) -> dict[str, str]:
    """``"llama3:70b=llama3:8b"`` -> ``{"llama3:70b": "llama3:8b"}`` (names normalised)."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        heavy, sep, light = (side.strip() for side in item.partition("="))
        if not sep or not heavy or not light:
            raise ValueError(f"expected HEAVY=LIGHT, got {item!r}")
        pairs[normalize_model(heavy)] = normalize_model(light)
    return pairs


def parse_api_keys(spec: str) -> dict[str, int | None]:
    """``"k1,k2:0"`` -> ``{"k1": None, "k2": 0}`` (a key's own default priority)."""
    keys: dict[str, int | None] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, prio = item.partition(":")
        if not sep:
            keys[key] = None
            continue
        if not prio.isdigit() or not 0 <= int(prio) <= 9:
            raise ValueError("an API key's priority (after ':') must be 0-9")
        keys[key] = int(prio)
    return keys


class WorkerSettings(CommonSettings):
    ollama_url: str = Field("http://127.0.0.1:11434", description="the node's own Ollama")
    node_id: str = Field("", description="unique node name (default: the host name)")
    num_parallel: int = Field(
        0,
        ge=0,
        validation_alias=AliasChoices("CORRAL_NUM_PARALLEL", "OLLAMA_NUM_PARALLEL", "num_parallel"),
        description="slots: jobs run at once (default: OLLAMA_NUM_PARALLEL, else 1)",
    )
    models: str = Field("", description="comma-separated models to serve (default: all it has)")
    heartbeat_interval: float = Field(2.0, gt=0, description="seconds between heartbeats")
    models_refresh: float = Field(10.0, gt=0, description="seconds between /api/tags re-reads")
    bell_timeout: float = Field(
        1.0, gt=0, description="longest wait on the doorbell before looking at the queues anyway"
    )
    connect_timeout: float = Field(5.0, gt=0, description="seconds to connect to Ollama")
    read_timeout: float = Field(
        600.0, gt=0, description="seconds Ollama may stay silent (cold model loads are slow)"
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="on SIGTERM, seconds to let running jobs finish before handing back"
    )
    ps_timeout: float = Field(
        2.0,
        gt=0,
        description="seconds the worker waits for Ollama's /api/ps (loaded models) before "
        "keeping the last answer; heartbeats never wait on Ollama",
    )
    replay_max_messages: int = Field(
        2048,
        ge=1,
        description="streamed chunks of one job kept in Redis for replay; past it the client "
        "still gets every chunk live, but a gateway that lost messages cannot relay the rest "
        "and a node's death cannot be resumed from",
    )
    clock_offset: float = Field(
        0.0,
        description="testing only: seconds added to this worker's own clock, to show that "
        "no decision compares it with another host's",
    )
    breaker_failures: int = Field(
        3,
        ge=0,
        description="backend failures within breaker_window that open the node's circuit "
        "breaker (it stops claiming); 0 turns the breaker off",
    )
    breaker_window: float = Field(
        30.0, gt=0, description="seconds over which backend failures are counted"
    )
    breaker_cooldown: float = Field(
        15.0,
        gt=0,
        description="seconds an open breaker waits before it goes half-open and claims one "
        "probe job (success closes it, failure opens it again)",
    )
    weight: int = Field(
        1,
        ge=1,
        le=1000,
        description="claim preference: while a node of higher weight with a free slot serves "
        "the model, this node claims only jobs that have waited weight_step seconds per "
        "such node",
    )
    backup: bool = Field(
        False,
        description="a backup node claims a model's jobs only while no primary node serving "
        "it has a free slot, or once a job has waited spill_after seconds",
    )
    weight_step: float = Field(
        0.05, ge=0, description="seconds of claim delay per free node of higher weight"
    )
    spill_after: float = Field(
        2.0,
        ge=0,
        description="seconds a job waits before a backup node takes it although a primary "
        "has a free slot",
    )
    locality_wait: float = Field(
        10.0,
        ge=0,
        description="longest a node without the model loaded leaves a job to nodes that have "
        "it loaded (or are loading it), when they would drain the model's queue sooner than "
        "a load here; 0 turns model locality off",
    )
    load_cost: float = Field(
        5.0,
        ge=0,
        description="seconds a model load is assumed to take on this node until Ollama's "
        "load_duration has been measured for it",
    )
    tail_aware: bool = Field(
        True,
        description="leave a short backlog of a model to nodes measured faster at it, when "
        "they would finish it sooner even after waiting for a slot",
    )
    embed_batching: bool = Field(
        True,
        description="send embed jobs for one model that run together as one /api/embed "
        "call with a list input, split back per job",
    )
    embed_batch_window: float = Field(
        0.0,
        ge=0,
        le=1,
        description="seconds an embed job waits for others to join its batch (0: only jobs "
        "claimed together share a call)",
    )
    model_options: str = Field(
        "",
        description='JSON object of runner options forced per model, e.g. {"llama3:latest": '
        '{"num_ctx": 8192}}: requests that differ only there no longer make Ollama reload it',
    )

    def resolved_node_id(self) -> str:
        return self.node_id or socket.gethostname()

    def resolved_slots(self) -> int:
        return self.num_parallel or 1

    def model_filter(self) -> set[str]:
        return {m.strip() for m in self.models.split(",") if m.strip()}

    @field_validator("model_options")
    @classmethod
    def _options_object(cls, value: str) -> str:
        parse_model_options(value)
        return value

    def forced_options(self) -> dict[str, dict[str, Any]]:
        return parse_model_options(self.model_options)


RELOAD_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread"}
)
"""Runner options that make Ollama reload a loaded model when a request differs there."""


def parse_model_options(spec: str) -> dict[str, dict[str, Any]]:
    """``model_options``: model name to the runner options forced on its requests."""
    if not spec.strip():
        return {}
    try:
        parsed = json.loads(spec)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
        raise ValueError("must be a JSON object of model name to an object of options")
    for model, options in parsed.items():
        unknown = sorted(set(options) - RELOAD_OPTIONS)
        if unknown:
            raise ValueError(
                f"{model}: {', '.join(unknown)} not a runner option that forces a reload "
                f"({', '.join(sorted(RELOAD_OPTIONS))})"
            )
    return parsed


class SchedulerSettings(CommonSettings):
    interval: float = Field(1.0, gt=0, description="seconds between maintenance passes")
    lease_ttl: float = Field(5.0, gt=0, description="seconds the active scheduler's lease lasts")
    retry_base: float = Field(
        1.0, gt=0, description="backoff before the first retry, doubling (RQ: whole seconds)"
    )
    retry_cap: float = Field(30.0, gt=0, description="longest backoff between retries")
    rq_worker: bool = Field(True, description="run an RQ worker child process for retry jobs")
    levels: bool = Field(
        True,
        description="compute degradation levels; off publishes level 0 (with the drain "
        "rates, so admission still knows the wait)",
    )
    level_minor: float = Field(0.6, gt=0, description="load at which level 1 (minor) begins")
    level_major: float = Field(0.8, gt=0, description="load at which level 2 (major) begins")
    level_critical: float = Field(0.95, gt=0, description="load at which level 3 (critical) begins")
    level_hysteresis: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="a level is left only once the load is this far below its threshold",
    )
    level_hold: float = Field(
        3.0,
        ge=0,
        description="seconds a level is kept at least after the load last reached it",
    )
    level_jobs_per_slot: float = Field(
        2.0,
        gt=0,
        description="queued plus running jobs per live slot that count as full load "
        "(2: every slot busy and one job waiting for each)",
    )
    level_wait_full: float = Field(
        60.0, gt=0, description="expected queue wait (seconds) that counts as full load"
    )
    drain_window: float = Field(
        30.0, gt=0, description="seconds over which drain rates are averaged (time-decayed)"
    )
    load_ttl: float = Field(
        10.0,
        gt=0,
        description="seconds the published level lives without a new pass: gateways fall "
        "back to level 0 when the scheduler stops publishing",
    )

    @model_validator(mode="after")
    def _rising_thresholds(self) -> Self:
        if not self.level_minor < self.level_major < self.level_critical:
            raise ValueError(
                "CORRAL_LEVEL_MINOR < CORRAL_LEVEL_MAJOR < CORRAL_LEVEL_CRITICAL is required"
            )
        return self

    def thresholds(self) -> tuple[float, float, float]:
        return (self.level_minor, self.level_major, self.level_critical)
