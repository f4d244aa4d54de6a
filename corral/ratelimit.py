"""Rate limits per key and per class, shared exactly by every gateway process.

Each limit is a sliding window of one minute kept in Redis (``corral/lua/ratelimit.lua``):
a request is admitted only if every limit it falls under (requests and tokens, per key and
per class) has room for it, and then charged to all of them in the same step, on Redis's
clock. So ten gateways sharing one Redis admit exactly as many requests as one would, and
no window ever holds more than its limit (a sliding log, unlike a fixed window, has no
boundary at which twice the limit gets through).

Tokens are charged at admission as the request's ``num_predict`` after the class's ceiling
(or ``token_charge_default`` when it names none); the actual count is not settled after
the job, so a generation that stops early still counts in full for the minute.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from corral import keys
from corral.scripts import argv, source
from corral.tenants import ApiKey, KeyClass

WINDOW_MS = 60_000


@dataclass(slots=True, frozen=True)
class Charge:
    """``ratelimit.lua``: the limits in KEYS order, and what this request costs each."""

    limits: list[int]
    costs: list[int]
    window_ms: int
    member: str


@dataclass(slots=True, frozen=True)
class Decision:
    allowed: bool
    retry_after: float
    """Seconds until the request would fit (-1: never, it costs more than a limit)."""
    limit: int
    """The tightest limit's size (for ``RateLimit-Limit``)."""
    remaining: int
    reset: float
    """Seconds until the tightest window frees its oldest charge."""


class RateLimiter:
    def __init__(self, redis: Redis) -> None:
        self.script: AsyncScript = redis.register_script(source("ratelimit"))

    async def charge(self, key: ApiKey, klass: KeyClass, tokens: int) -> Decision | None:
        """Charge one request of ``tokens`` to every limit of ``key`` and its class; None
        when the class has no limits (no Redis call)."""
        pairs: list[tuple[str, str, str, int, int]] = []
        for subject, name, what, limit, cost in (
            ("key", key.id, "req", klass.key_rpm, 1),
            ("key", key.id, "tok", klass.key_tpm, tokens),
            ("class", klass.name, "req", klass.class_rpm, 1),
            ("class", klass.name, "tok", klass.class_tpm, tokens),
        ):
            if limit:
                pairs.append((subject, name, what, limit, cost))
        if not pairs:
            return None
        redis_keys: list[str] = []
        for subject, name, what, _, _ in pairs:
            redis_keys += [keys.rate_log(subject, name, what), keys.rate_sum(subject, name, what)]
        named = Charge(
            limits=[p[3] for p in pairs],
            costs=[p[4] for p in pairs],
            window_ms=WINDOW_MS,
            member=uuid.uuid4().hex,
        )
        allowed, retry, limit, remaining, reset = await self.script(
            keys=redis_keys, args=argv(named)
        )
        return Decision(
            allowed=bool(allowed),
            retry_after=int(retry) / 1000 if int(retry) >= 0 else -1.0,
            limit=int(limit),
            remaining=int(remaining),
            reset=int(reset) / 1000,
        )
