"""What a key holds in Redis against its stored-bytes quota: read here, kept by the scripts.

The job scripts account for it (``corral.scripts.HELPERS``): enqueue charges a job's
request to its ``tenant`` (the id of the API key that sent it) and refuses the job when
the key's quota would be passed; the end of a job swaps the request for the result of a
``wait: false`` job, and a record's expiry gives its bytes back at the key's next enqueue.
"""

from __future__ import annotations

from redis.asyncio import Redis

from corral import keys


async def usage(redis: Redis, key_id: str) -> int:
    """Bytes the key's jobs hold in Redis now."""
    return int(await redis.get(keys.tenant_bytes(key_id)) or 0)
