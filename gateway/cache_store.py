"""The two tiers of the response cache: an in-process L1 and the shared L2 in Redis.

L1 is an LRU bounded in bytes with a TTL (cachetools). L2 is one Redis string per answer,
with a TTL, written by ``cache_put.lua``, which keeps every entry's size in a fleet-wide
byte count and evicts the entries closest to expiry while the count would pass
CORRAL_CACHE_L2_BYTES: Redis memory used by the cache stays bounded whatever Redis's own
``maxmemory-policy`` is.

The cache is best effort. A lookup that takes longer than CORRAL_CACHE_LOOKUP_TIMEOUT,
fails, or finds bytes that do not decode is a miss; a write that Redis refuses (OOM at
``maxmemory``) is logged and dropped: the answer has already gone out.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib
from collections import Counter
from dataclasses import dataclass

from cachetools import TTLCache
from redis.asyncio import Redis
from redis.exceptions import RedisError

from corral import keys, scripts
from corral.scripts import argv
from corral.settings import GatewaySettings

log = logging.getLogger(__name__)

MAGIC = b"CRC1"
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<4sII")  # magic, crc32 of the rest, chunk count
ENTRY_OVERHEAD = 64
"""Bytes counted per stored payload on top of its length (Python object, framing)."""


class CorruptEntry(ValueError):
    """Stored bytes that are not a cache entry (truncated, overwritten, another format)."""


@dataclass(slots=True, frozen=True)
class Answer:
    """A completed answer as the worker sent it: the chunks in order, then the final object.

    A single (non-streamed) answer has no chunks; its final object is the whole answer."""

    chunks: tuple[bytes, ...]
    final: bytes

    @property
    def size(self) -> int:
        return (
            sum(map(len, self.chunks)) + len(self.final) + ENTRY_OVERHEAD * (len(self.chunks) + 1)
        )


def encode(answer: Answer) -> bytes:
    parts = [_U32.pack(len(c)) + c for c in answer.chunks]
    parts.append(_U32.pack(len(answer.final)) + answer.final)
    body = b"".join(parts)
    count = len(answer.chunks)
    crc = zlib.crc32(body, zlib.crc32(_U32.pack(count)))
    return _HEADER.pack(MAGIC, crc, count) + body


def decode(data: bytes) -> Answer:
    """The answer stored in ``data``; ``CorruptEntry`` when it is not a whole entry."""
    if len(data) < _HEADER.size:
        raise CorruptEntry("too short")
    magic, crc, count = _HEADER.unpack_from(data)
    body = memoryview(data)[_HEADER.size :]
    if magic != MAGIC or zlib.crc32(body, zlib.crc32(_U32.pack(count))) != crc:
        raise CorruptEntry("bad magic or checksum")
    payloads: list[bytes] = []
    at = 0
    for _ in range(count + 1):
        if at + 4 > len(body):
            raise CorruptEntry("truncated")
        (size,) = _U32.unpack_from(body, at)
        at += 4
        if at + size > len(body):
            raise CorruptEntry("truncated")
        payloads.append(bytes(body[at : at + size]))
        at += size
    if at != len(body):
        raise CorruptEntry("trailing bytes")
    return Answer(tuple(payloads[:-1]), payloads[-1])


@dataclass(slots=True, frozen=True)
class CachePut:
    """``cache_put.lua``; ARGV[2] is the encoded entry."""

    ttl_ms: int
    cap: int
    """CORRAL_CACHE_L2_BYTES."""
    sweep: int
    """Most expired entries whose bytes one call stops counting."""
    max_evict: int
    """Most entries one call evicts to make room (the write is skipped beyond)."""


class _L1(TTLCache[str, Answer]):
    """cachetools' TTL cache sized in bytes; counts the entries it evicts for room."""

    evictions = 0

    def popitem(self) -> tuple[str, Answer]:
        item = super().popitem()
        self.evictions += 1
        return item


class CacheStore:
    """L1 and L2 of one gateway process, and its request counters."""

    def __init__(self, redis: Redis, settings: GatewaySettings) -> None:
        self.redis = redis
        self.settings = settings
        self.l1: _L1 | None = (
            _L1(maxsize=settings.cache_l1_bytes, ttl=settings.cache_l1_ttl, getsizeof=_size)
            if settings.cache_l1_bytes > 0
            else None
        )
        self._put = scripts.Function(redis, "cache_put")
        self.outcomes: Counter[str] = Counter()
        """``hit``, ``miss``, ``bypass``: requests answered this way by this process."""
        self.write_failures = 0
        self.corrupt = 0

    # -- L1 ------------------------------------------------------------------------

    def local(self, key: str) -> Answer | None:
        return self.l1.get(key) if self.l1 is not None else None

    def remember(self, key: str, answer: Answer) -> None:
        if self.l1 is not None and answer.size <= self.l1.maxsize:
            self.l1[key] = answer

    # -- L2 ------------------------------------------------------------------------

    async def fetch(self, key: str) -> Answer | None:
        """The answer stored in Redis, or None (missing, unreadable in time, corrupt)."""
        try:
            async with asyncio.timeout(self.settings.cache_lookup_timeout):
                data = await self.redis.get(keys.cache_entry(key))
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("cache lookup failed, answering as a miss: %r", exc)
            return None
        if data is None:
            return None
        answer = self.decoded(key, data)
        if answer is None:
            await self._drop(key)
        return answer

    def decoded(self, key: str, data: bytes | str) -> Answer | None:
        """The answer in stored ``data`` (kept in L1 too), or None when it is corrupt."""
        try:
            answer = decode(data if isinstance(data, bytes) else data.encode())
        except CorruptEntry as exc:
            self.corrupt += 1
            log.warning("cache entry %s is corrupt (%s): a miss, and it is replaced", key, exc)
            return None
        self.remember(key, answer)
        return answer

    async def store(self, key: str, answer: Answer, *, level: int) -> None:
        """Keep ``answer`` in both tiers (best effort: never raises for Redis)."""
        if answer.size > self.settings.cache_entry_max_bytes:
            return
        self.remember(key, answer)
        ttl = self.settings.cache_ttl_degraded if level >= 1 else self.settings.cache_ttl
        named = CachePut(
            ttl_ms=int(ttl * 1000), cap=self.settings.cache_l2_bytes, sweep=64, max_evict=256
        )
        entry = keys.cache_entry(key)
        try:
            await self._put(
                keys=[entry, keys.CACHE_INDEX, keys.CACHE_SIZES, keys.CACHE_STATS],
                args=argv(named, encode(answer)),
            )
        except (RedisError, OSError) as exc:
            self.write_failures += 1
            log.warning("cache write of %s failed (the answer went out anyway): %r", key, exc)

    async def _drop(self, key: str) -> None:
        try:
            async with asyncio.timeout(self.settings.cache_lookup_timeout):
                await self.redis.delete(keys.cache_entry(key))
        except (TimeoutError, RedisError, OSError):
            pass  # it expires on its own

    async def l2_figures(self) -> tuple[int, int]:
        """(bytes, evictions) of the shared L2, from its counters in Redis."""
        raw = await self.redis.hmget(keys.CACHE_STATS, "bytes", "evictions")
        return int(raw[0] or 0), int(raw[1] or 0)

    @property
    def l1_bytes(self) -> int:
        return int(self.l1.currsize) if self.l1 is not None else 0

    @property
    def l1_evictions(self) -> int:
        return self.l1.evictions if self.l1 is not None else 0


def _size(answer: Answer) -> int:
    return answer.size
