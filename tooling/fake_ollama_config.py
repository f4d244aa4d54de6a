"""Settings of the fake Ollama server, and their validation for runtime changes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_MODELS = ("llama3:latest", "qwen2:0.5b", "nomic-embed-text:latest")
GARBAGE_KINDS = ("json", "html", "truncate", "cut")
"""What a garbage answer looks like: a non-JSON line mid-stream, a proxy's HTML 502 page,
a stream that ends before its ``done`` line, or a connection closed before it."""
MIXED = "mixed"
"""Garbage kind that takes each of ``GARBAGE_KINDS`` in turn."""


def _default_models() -> list[str]:
    return list(DEFAULT_MODELS)


@dataclass
class FakeOllamaConfig:
    """Everything that shapes how the fake behaves; most of it can change while it runs."""

    models: list[str] = field(default_factory=_default_models)
    # Mirrors OLLAMA_NUM_PARALLEL: concurrent requests one loaded model serves.
    num_parallel: int = 1
    # Mirrors OLLAMA_MAX_LOADED_MODELS.
    max_loaded_models: int = 3
    # Mirrors OLLAMA_MAX_QUEUE: waiting requests beyond this are answered 503.
    max_queue: int = 512
    # Seconds a model takes to load before it can serve.
    load_delay: float = 0.0
    # Tokens per second per request; 0 means as fast as possible.
    token_rate: float = 0.0
    embedding_dim: int = 16
    # Failure injection.
    fail_rate: float = 0.0
    fail_status: int = 500
    fail_next: int = 0
    crash_after_tokens: int | None = None
    hang: bool = False
    # Garbage answers, as from a broken proxy or runner: for generations whose prompt
    # contains `garbage_marker` (when set) and for a `garbage_rate` share of the others,
    # after `garbage_after_tokens` tokens. Garbage never counts as a completion.
    garbage_marker: str = ""
    garbage_rate: float = 0.0
    garbage_kind: str = MIXED
    garbage_after_tokens: int = 0
    # Seconds every /api/ps answer is held back (a node too busy to answer quickly).
    ps_delay: float = 0.0
    seed: int = 0
    # Models loaded at start, without delay.
    preloaded: list[str] = field(default_factory=list)
    # Ollama's default num_ctx when a request does not set one.
    context_length: int = 4096
    # Seconds an idle model stays loaded when a request gives no keep_alive (Ollama: 5m).
    keep_alive: float = 300.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_int(name: str, value: Any) -> int:
    # bool is an int subclass, but `true` for a count is a caller bug worth reporting.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be an integer")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if not number.is_integer():
        raise ValueError(f"{name} must be an integer")
    return int(number)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number") from None


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a boolean")
    return value


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _garbage_kind(name: str, value: Any) -> str:
    kinds = (*GARBAGE_KINDS, MIXED)
    if value not in kinds:
        raise ValueError(f"{name} must be one of {', '.join(kinds)}")
    return str(value)


def _as_names(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name} must be a list of model names")
    return [item.strip() for item in value]


def _as_optional_int(name: str, value: Any) -> int | None:
    return None if value is None else _as_int(name, value)


def _at_least(minimum: float, convert: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def checked(name: str, value: Any) -> Any:
        converted = convert(name, value)
        if converted is not None and converted < minimum:
            raise ValueError(f"{name} must be >= {minimum:g}")
        return converted

    return checked


def _status(name: str, value: Any) -> int:
    code = _as_int(name, value)
    if not 400 <= code <= 599:
        raise ValueError(f"{name} must be an HTTP error status (400-599)")
    return code


def _probability(name: str, value: Any) -> float:
    rate = _as_float(name, value)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1")
    return rate


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "models": _as_names,
    "preloaded": _as_names,
    "num_parallel": _at_least(1, _as_int),
    "max_loaded_models": _at_least(1, _as_int),
    "max_queue": _at_least(0, _as_int),
    "load_delay": _at_least(0, _as_float),
    "token_rate": _at_least(0, _as_float),
    "embedding_dim": _at_least(1, _as_int),
    "fail_rate": _probability,
    "fail_status": _status,
    "fail_next": _at_least(0, _as_int),
    "crash_after_tokens": _at_least(0, _as_optional_int),
    "hang": _as_bool,
    "garbage_marker": _as_str,
    "garbage_rate": _probability,
    "garbage_kind": _garbage_kind,
    "garbage_after_tokens": _at_least(0, _as_int),
    "ps_delay": _at_least(0, _as_float),
    "seed": _as_int,
    "context_length": _at_least(1, _as_int),
    "keep_alive": _as_float,
}


def validate_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Check and convert a partial config; raises ValueError naming the first bad field."""
    known = {f.name for f in fields(FakeOllamaConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    return {name: _CONVERTERS[name](name, value) for name, value in changes.items()}
