"""Typed settings, one object per process, built at the entry point and passed down.

Every field is an environment variable with the ``CORRAL_`` prefix and a command-line
flag of the same name (``redis_url`` is ``CORRAL_REDIS_URL`` and ``--redis-url``).
Flags win over the environment, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import uuid
from typing import Any, Self

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from corral.errors import ConfigError

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


def _problem(error: Any) -> str:
    """One line for one invalid setting: its variable, its flag, what is wrong, what it got."""
    loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    name = loc[0] if loc else ""
    where = f"CORRAL_{name.upper()} (--{name.replace('_', '-')})" if name else "settings"
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    if name in SECRET_FIELDS or "input" not in error:
        return f"{where}: {message}"
    return f"{where}: {message} (got {error['input']!r})"


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
    api_keys: str = Field(
        "",
        description="comma-separated bearer keys, each optionally KEY:PRIORITY; empty = no auth",
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

    def resolved_gateway_id(self) -> str:
        return self.gateway_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    @field_validator("api_keys")
    @classmethod
    def _no_placeholder_keys(cls, value: str) -> str:
        for key in parse_api_keys(value):
            if key.lower() in _PLACEHOLDER_KEYS:
                raise ValueError(f"refusing placeholder API key {key!r}")
        return value

    def key_priorities(self) -> dict[str, int | None]:
        return parse_api_keys(self.api_keys)


def parse_api_keys(spec: str) -> dict[str, int | None]:
    """``"k1,k2:0"`` -> ``{"k1": None, "k2": 0}`` (a key's own default priority)."""
    keys: dict[str, int | None] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, prio = item.partition(":")
        if not sep:
            keys[key] = None
            continue
        if not prio.isdigit() or not 0 <= int(prio) <= 9:
            raise ValueError(f"API key priority must be 0-9, got {prio!r}")
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
        "it loaded: it claims once the job waited the model's load cost, capped by this; "
        "0 turns model locality off",
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
