"""Redis clients with the timeouts each use needs.

redis-py 8 gives every socket a 5 s timeout and retries on it, which breaks blocking
reads and pub/sub; and its plain async pool fails past ``max_connections`` instead of
waiting. So: a blocking pool for request/response traffic, dedicated clients with a
long socket timeout for ``BLPOP``, and a client for subscriptions that never reconnects
behind its owner's back.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from corral.errors import RedisUnavailable

CONNECT_TIMEOUT = 5.0


def _retry() -> Retry:
    """Ride out a Redis restart: a pooled connection that went stale fails once, then
    reconnects. Safe because every Corral write is idempotent or guarded by a state check
    in its script, and replies carry sequence numbers the gateway deduplicates."""
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=6)


def pooled(url: str, size: int, *, command_timeout: float = 10.0) -> Redis:
    """A client for short commands; callers wait for a free connection rather than fail."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=size,
        timeout=command_timeout,
        socket_timeout=command_timeout,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=30,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def blocking(url: str, longest_block: float | None) -> Redis:
    """A client for blocking reads or pub/sub: its socket outlives the longest block.

    ``longest_block=None`` means no socket timeout at all (subscriptions).
    """
    timeout = None if longest_block is None else longest_block + 10.0
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_keepalive=True,
        single_connection_client=True,
    )


SUBSCRIBER_TIMEOUT = 5.0
"""Seconds a subscriber's connection set-up or command write may take. Reading the
subscription itself has no timeout: ``corral.subscription`` tells silence from death
with pings."""


def subscriber(url: str) -> Redis:
    """A client for ``corral.subscription.Subscription``.

    It does not retry: redis-py would otherwise reconnect and re-subscribe inside
    ``listen()`` without a word, and whatever was published in between would be lost
    with nobody to recover it. Every lost connection must reach the subscription, which
    subscribes again and has its owner replay what it missed.
    """
    return Redis.from_url(
        url,
        socket_timeout=SUBSCRIBER_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0, supported_errors=()),
    )


def text(value: object) -> str:
    """A Redis reply (bytes, or str from a decoding client) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def server_time(redis: Redis) -> float:
    """Redis's clock, in unix seconds: the one clock Corral compares across hosts."""
    seconds, micros = await redis.time()
    return float(seconds) + float(micros) / 1e6


async def ping(redis: Redis) -> None:
    try:
        await redis.ping()
    except RedisError as exc:
        raise RedisUnavailable(f"Redis did not answer: {exc}") from exc


TRANSIENT_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, RuntimeError)
"""Errors after which a loop should back off and try again rather than die. RuntimeError:
redis-py can surface asyncio's "unable to perform operation on a closed transport" while
Redis restarts."""
