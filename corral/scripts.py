"""The Lua scripts, loaded once per Redis client and called by name.

Each script is one atomic job-state transition; see the ``.lua`` files for their
KEYS and ARGV. Every script starts with the same prelude, which reads the one clock
Corral compares across hosts: Redis's own ``TIME`` (``NOW`` as text with microseconds,
``NOWN`` as a number). No script takes the caller's clock.
"""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

PRELUDE = """\
local _time = redis.call('TIME')
local NOW = string.format('%d.%06d', tonumber(_time[1]), tonumber(_time[2]))
local NOWN = tonumber(NOW)
"""


def source(name: str) -> str:
    """The text of ``corral/lua/<name>.lua``, after the clock prelude."""
    body = resources.files("corral").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return PRELUDE + body


class Scripts:
    """Registered scripts for one client; redis-py falls back from EVALSHA to EVAL itself."""

    def __init__(self, redis: Redis) -> None:
        self.enqueue: AsyncScript = redis.register_script(source("enqueue"))
        self.claim: AsyncScript = redis.register_script(source("claim"))
        self.finish: AsyncScript = redis.register_script(source("finish"))
        self.cancel: AsyncScript = redis.register_script(source("cancel"))
        self.requeue: AsyncScript = redis.register_script(source("requeue"))
        self.retry: AsyncScript = redis.register_script(source("retry"))


__all__ = ["Scripts", "source"]
