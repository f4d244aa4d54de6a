"""A lease in Redis so that, of several schedulers, exactly one is active.

The holder renews before the TTL runs out; if it dies, another takes the lease once
the TTL has passed. Renewal is compare-and-extend, so a scheduler that stalled past its
TTL cannot renew a lease someone else now holds.
"""

from __future__ import annotations

from redis.asyncio import Redis

from corral import keys
from corral.scripts import Function, argv
from corral.scripts import Lease as LeaseArgs


class Lease:
    def __init__(self, redis: Redis, holder: str, ttl: float) -> None:
        self.redis = redis
        self.holder = holder
        self.ttl_ms = int(ttl * 1000)
        self._renew = Function(redis, "lease_renew")
        self._release = Function(redis, "lease_release")
        self.held = False

    async def acquire_or_renew(self) -> bool:
        """True while this process holds the lease."""
        if self.held and await self._renew(
            keys=[keys.SCHEDULER_LEASE], args=argv(LeaseArgs(self.holder, self.ttl_ms))
        ):
            return True
        got = await self.redis.set(keys.SCHEDULER_LEASE, self.holder, nx=True, px=self.ttl_ms)
        self.held = bool(got)
        return self.held

    async def release(self) -> None:
        if self.held:
            await self._release(keys=[keys.SCHEDULER_LEASE], args=argv(LeaseArgs(self.holder)))
            self.held = False
