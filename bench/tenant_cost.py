"""What the per-tenant byte accounting costs the enqueue function, measured in Redis.

Enqueues ``JOBS`` jobs (1 KiB bodies) with and without a tenant, twice each, into a
fresh ``redis-server``, and reads the enqueue function's Redis time per call from
``INFO commandstats`` (``cmdstat_fcall``: the function and every command it runs), so
the client's own time and the shared machine's scheduling noise stay out of it.

    python bench/tenant_cost.py
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from corral.jobs import JobSpec, JobStore
from corral.keys import JobKind
from corral.tooling.redis_proc import RedisProcess

JOBS = 3000
BODY = b'{"model":"m","prompt":"' + b"x" * 1000 + b'"}'


async def fcall_usec(url: str, tenant: str) -> float:
    redis = Redis.from_url(url)
    try:
        await redis.flushall()
        store = JobStore(redis, job_ttl=60, result_ttl=60)
        await store.enqueue(_spec(tenant), max_queue=10**9)  # loads the library
        await redis.config_resetstat()
        for _ in range(JOBS):
            await store.enqueue(_spec(tenant), max_queue=10**9)
        stats = await redis.info("commandstats")
        return float(stats["cmdstat_fcall"]["usec_per_call"])
    finally:
        await redis.aclose()


def _spec(tenant: str) -> JobSpec:
    return JobSpec(
        kind=JobKind.GENERATE,
        model="m",
        request=BODY,
        priority=5,
        gateway_id="bench",
        stream=False,
        tenant=tenant,
        quota=10**12,
    )


async def main() -> int:
    server = RedisProcess().start()
    try:
        rows = []
        for tenant in ("", "tenant-a", "", "tenant-a"):
            rows.append((tenant or "(none)", await fcall_usec(server.url, tenant)))
    finally:
        server.stop()
    print(f"enqueue function, Redis µs per call ({JOBS} calls, 1 KiB bodies):")
    for tenant, usec in rows:
        print(f"  tenant {tenant:<10} {usec:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
