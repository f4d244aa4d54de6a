"""Rate limits per key and per class, shared exactly by every gateway process.

Each limit is a sliding window of one minute kept in Redis (``corral/lua/ratelimit.lua``):
a request is admitted only if every limit it falls under (requests and tokens, per key and
per class) has room for it, and then charged to all of them in the same step, on Redis's
clock. So ten gateways sharing one Redis admit exactly as many requests as one would, and
no window ever holds more than its limit (a sliding log, unlike a fixed window, has no
boundary at which twice the limit gets through).

Tokens are charged at admission as the request's ``num_predict`` after the class's ceiling
(or ``token_charge_default`` when it names none), then settled when its job is done: what
it did not generate (Ollama's ``eval_count``) is given back, in the same windows
(``ratelimit_settle.lua``), the charge keeping its place in time.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

from corral import keys
from corral.scripts import Function, argv
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
class Settle:
    """``ratelimit_settle.lua``: the charge's member and, per token limit in KEYS order,
    ``[its index in the charge, the cost charged]``."""

    member: str
    entries: list[list[int]]
    used: int


@dataclass(slots=True, frozen=True)
class Ticket:
    """What settling one admitted request's token charge needs."""

    member: str
    keys: list[str]
    entries: list[list[int]]


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
    ticket: Ticket | None = None
    """Set when the request was admitted with a token charge to settle."""


class RateLimiter:
    def __init__(self, redis: Redis) -> None:
        self.script = Function(redis, "ratelimit")
        self.settle_script = Function(redis, "ratelimit_settle")

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
        ticket = None
        tok = [i for i, p in enumerate(pairs) if p[2] == "tok" and p[4] > 0]
        if allowed and tok:
            ticket = Ticket(
                member=named.member,
                keys=[k for i in tok for k in redis_keys[2 * i : 2 * i + 2]],
                entries=[[i + 1, pairs[i][4]] for i in tok],  # Lua counts from 1
            )
        return Decision(
            allowed=bool(allowed),
            retry_after=int(retry) / 1000 if int(retry) >= 0 else -1.0,
            limit=int(limit),
            remaining=int(remaining),
            reset=int(reset) / 1000,
            ticket=ticket,
        )

    async def settle(self, ticket: Ticket, used: int) -> int:
        """Give back what an admitted request was charged beyond the ``used`` tokens;
        returns how many tokens went back."""
        named = Settle(member=ticket.member, entries=ticket.entries, used=max(0, used))
        back = await self.settle_script(keys=ticket.keys, args=argv(named))
        return int(back)
