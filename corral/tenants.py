"""Tenants: API keys, the classes they belong to, and what each class may do.

A key is stored only as its SHA-256 digest (``corral.keys.API_KEYS``): Redis never holds
a secret a reader could replay. Keys are random 256-bit tokens, so a plain digest (no
salt, no slow hash) is as strong as a password hash would be, and cheap enough to take
on every request.

A class carries the limits its keys share: the most urgent priority they may ask for,
the models they may use, a ``num_predict`` ceiling, a byte quota for stored request
bodies and rate limits per key and per class. Zero means "no limit" throughout.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

import orjson


class Scope(StrEnum):
    """What a key may do; every route names the one it needs (``corral.gateway.auth``)."""

    PUBLIC = "public"
    """No key needed (``/``, ``/api/version``, ``/healthz``, ``/openapi.json``)."""
    USER = "user"
    """Generate, chat, embed, list models, its own jobs."""
    METRICS = "metrics"
    """Scrape ``/metrics``."""
    ADMIN = "admin"
    """Everything: ``/nodes``, ``/status``, every job."""


KEY_SCOPES = (Scope.USER, Scope.METRICS, Scope.ADMIN)
"""The scopes a key can hold (``public`` needs none)."""

TOKEN_PREFIX = "crl_"


def new_token() -> str:
    """A fresh secret: 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(spec: str) -> frozenset[Scope]:
    """``"user,metrics"`` -> the scopes; an unknown name is a ``ValueError``."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    known = {scope.value for scope in KEY_SCOPES}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r} (known: user, metrics, admin)")
    return frozenset(Scope(name) for name in names)


@dataclass(frozen=True, slots=True)
class KeyClass:
    """The limits a class of keys shares. Zero (or empty) is no limit."""

    name: str
    priority_ceiling: int = 0
    """The most urgent priority (lowest number) a key of this class may run at; a request
    asking for more urgency is clamped to it."""
    models: tuple[str, ...] = ()
    """Models this class may use (empty: every model)."""
    num_predict_max: int = 0
    """The most tokens one generation may ask for; more, or Ollama's -1 (no end), is
    clamped to it."""
    quota_bytes: int = 0
    """Request bytes the keys of this class may each keep stored in ``wait: false`` jobs."""
    key_rpm: int = 0
    """Requests per minute, per key."""
    key_tpm: int = 0
    """Tokens per minute, per key (charged as the request's ``num_predict``, then settled to
    what it generated)."""
    class_rpm: int = 0
    """Requests per minute, all keys of the class together."""
    class_tpm: int = 0
    """Tokens per minute, all keys of the class together."""

    def __post_init__(self) -> None:
        if not self.name or "," in self.name or ":" in self.name:
            raise ValueError(f"invalid class name {self.name!r}")
        if not 0 <= self.priority_ceiling <= 9:
            raise ValueError("priority_ceiling must be 0-9")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{f.name} must be 0 or more")

    @property
    def rate_limited(self) -> bool:
        return bool(self.key_rpm or self.key_tpm or self.class_rpm or self.class_tpm)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> KeyClass:
        value: dict[str, Any] = orjson.loads(raw)
        known = {f.name for f in fields(cls)}
        value = {k: v for k, v in value.items() if k in known}
        value["models"] = tuple(value.get("models", ()))
        return cls(**value)


OPEN_CLASS = KeyClass("open")
"""The class of keys that name none, and of every caller when no keys exist: no limits."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's record, without the key."""

    id: str
    key_class: str = ""
    """Its class's name (empty: no class, no limits)."""
    scopes: frozenset[Scope] = field(default_factory=lambda: frozenset({Scope.USER}))
    priority: int | None = None
    """The priority its requests run at when they ask for none (None: the gateway's)."""
    created: float = 0.0

    def allows(self, scope: Scope) -> bool:
        return scope is Scope.PUBLIC or scope in self.scopes or Scope.ADMIN in self.scopes

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "class": self.key_class,
                "scopes": sorted(self.scopes),
                "priority": self.priority,
                "created": self.created,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ApiKey:
        value: dict[str, Any] = orjson.loads(raw)
        return cls(
            id=str(value["id"]),
            key_class=str(value.get("class") or ""),
            scopes=parse_scopes(",".join(value.get("scopes", ["user"]))),
            priority=value.get("priority"),
            created=float(value.get("created") or 0.0),
        )


ANONYMOUS = ApiKey(id="", scopes=frozenset(KEY_SCOPES))
"""The caller when no keys are configured at all: Corral is open, as it always was."""
