"""Reading and checking what clients send: body size, JSON, auth, priority, timeout.

The fields of a body are checked against its declared model (``corral.gateway.validation``).

Every refusal is a ``RequestError`` subclass with Ollama's wording where Ollama has one;
the app turns it into ``{"error": ...}`` (or the OpenAI shape) with its status.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
from starlette.requests import Request

from corral.errors import BadRequest, PayloadTooLarge, RequestTimeout, Unauthorized
from corral.names import normalize_model
from corral.settings import GatewaySettings

PRIORITY_HEADER = "x-corral-priority"
TIMEOUT_HEADER = "x-corral-timeout"
RUN_TIMEOUT_HEADER = "x-corral-run-timeout"


async def read_json(request: Request, limit: int, within: float) -> dict[str, Any]:
    """The body as a JSON object, refusing more than ``limit`` bytes before reading them,
    and a body that takes longer than ``within`` seconds to arrive."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body too large: {declared} bytes (limit {limit})")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(within):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body too large (limit {limit} bytes)")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(f"request body not received within {within:g}s") from exc
    body = b"".join(chunks)
    if not body.strip():
        raise BadRequest("missing request body")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON in request body: {exc}") from exc
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    # A job's body is stored as JSON again, and orjson writes at most MAX_DEPTH levels:
    # refuse deeper bodies here (a 400) rather than fail when the job is built (a 500).
    # Counting brackets first keeps the walk off every ordinary body.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise BadRequest(f"request body nests JSON deeper than {MAX_DEPTH} levels")
    return value


MAX_DEPTH = 250
"""How deeply a request body may nest arrays and objects (orjson writes up to 254)."""


def _depth(value: object) -> int:
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            level.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            level.extend((v, depth + 1) for v in item)
    return deepest


def api_key_priority(request: Request, settings: GatewaySettings) -> int | None:
    """Check the bearer key when keys are configured; returns the key's own priority."""
    allowed = settings.key_priorities()
    if not allowed:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or token.strip() not in allowed:
        raise Unauthorized("unauthorized: a valid API key is required (Authorization: Bearer ...)")
    return allowed[token.strip()]


def tenant(request: Request, settings: GatewaySettings) -> str:
    """Who an authenticated request's stored bytes are charged to: an id of its API key
    (a hash, so the key itself is never stored); '' when no keys are configured."""
    if not settings.api_keys:
        return ""
    token = request.headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def priority(request: Request, default: int) -> int:
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return default
    raw = raw.strip()
    if not raw.isdigit() or not 0 <= int(raw) <= 9:
        raise BadRequest(f"invalid X-Corral-Priority {raw!r}: must be an integer from 0 to 9")
    return int(raw)


def timeout(request: Request, default: float) -> float:
    """Seconds this request may wait for its answer (the X-Corral-Timeout header)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86_400:
        raise BadRequest(f"invalid X-Corral-Timeout {raw!r}: must be seconds, above 0")
    return min(value, default)


def run_timeout(request: Request, default: float, ceiling: float) -> float:
    """Seconds one attempt of this job may run on a node (the X-Corral-Run-Timeout header)."""
    raw = request.headers.get(RUN_TIMEOUT_HEADER)
    if raw is None:
        return min(default, ceiling)
    return checked_run_timeout(raw, ceiling, f"X-Corral-Run-Timeout {raw!r}")


def checked_run_timeout(raw: object, ceiling: float, what: str) -> float:
    """A requested run time: seconds above 0, at most ``ceiling`` (a clear 400 otherwise)."""
    try:
        value = float(raw) if not isinstance(raw, bool) else -1.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value <= ceiling:
        raise BadRequest(f"invalid {what}: must be seconds above 0 and at most {ceiling:g}")
    return value


def model_name(body: dict[str, Any]) -> str:
    """The model of a body already checked against its declared model, normalised."""
    model = body.get("model")
    if not model:  # Ollama's own answer to a missing or empty model
        raise BadRequest("model is required")
    return normalize_model(str(model))
