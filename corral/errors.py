"""Corral's exception tree.

``CorralError`` is the root. ``RequestError`` and its children carry an HTTP status
and an Ollama-style message, so the gateway can answer ``{"error": ...}`` from any of
them; ``BackendError`` is what a worker raises for a failed Ollama call, with whether
a retry could help. Foreign errors (httpx, redis) are translated into these at the
module that talks to the foreign library, with ``raise ... from exc``.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error Corral raises on purpose."""


class ConfigError(CorralError):
    """Settings are missing or invalid; raised at start-up, before any work is taken.

    ``problems`` holds one line per bad setting, ready to print."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class RedisUnavailable(CorralError):
    """Redis could not be reached or answered with an error."""


class RequestError(CorralError):
    """A request that Corral refuses, with the status and message to answer it with."""

    status = 400

    def __init__(
        self, message: str, status: int | None = None, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}
        """Response headers the refusal needs (``WWW-Authenticate``, ``Retry-After``...)."""


class BadRequest(RequestError):
    status = 400


class Unauthorized(RequestError):
    status = 401


class Forbidden(RequestError):
    status = 403


class RateLimited(RequestError):
    """Over a rate limit, a quota, or too many failed authentications (429, with headers)."""

    status = 429


class NotFound(RequestError):
    status = 404


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f'model "{model}" not found, try pulling it first')
        self.model = model


class RequestTimeout(RequestError):
    """The client took too long to send its request."""

    status = 408


class PayloadTooLarge(RequestError):
    status = 413


class QueueFull(RequestError):
    """A queue is at its bound; clients should retry later (503, 429 on ``/v1``, with a
    ``Retry-After``). ``retry_after`` is the estimate in seconds (None: the gateway
    estimates it from the drain rate of ``model``'s queue)."""

    status = 503

    def __init__(self, message: str, *, model: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.retry_after = retry_after


class QuotaExceeded(RequestError):
    """The tenant already holds its quota of bytes in Redis (request bodies of its live
    jobs, results of its finished ``wait: false`` jobs): nothing was stored."""

    status = 429


class MemoryFull(RequestError):
    """Redis is near its ``maxmemory``: new work is refused before writes start failing."""

    status = 503


class Overloaded(QueueFull):
    """Shed at degradation level 3: this priority is refused until the load falls."""


class WaitTooLong(QueueFull):
    """The job's expected queue wait is longer than the time it may wait: refused at once
    instead of queueing only to expire."""

    def __init__(self, message: str, *, model: str, wait: float) -> None:
        super().__init__(message, model=model, retry_after=wait)
        self.wait = wait


class BackendError(CorralError):
    """An Ollama call failed. ``retriable`` says whether another node or attempt may succeed."""

    def __init__(self, message: str, status: int = 502, *, retriable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retriable = retriable
