"""What makes a request cacheable, and the canonical key of its answer.

The key hashes what determines the answer of the resolved Ollama request: model (after
resolution), kind, prompt or messages, system, template, format, tools, images and the
options that change output, plus whether the client streams (a streamed answer is kept
as its chunks, a single answer as one object). Never the API key or the priority: they
travel outside the body. Options that only say how to run (threads, GPU layers, memory
mapping) and ``keep_alive`` are left out, so they share one entry.

Only deterministic requests are cacheable by default: ``temperature`` 0, or a fixed
``seed`` (Ollama's sampler then repeats itself). ``widen`` caches the others too.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from corral.keys import JobKind

VERSION = b"1"
"""Part of every key: bump it when the stored format or the key's inputs change."""

RUNTIME_OPTIONS = frozenset(
    {
        "num_thread",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "use_mmap",
        "use_mlock",
        "numa",
        "num_batch",
    }
)
"""Options that change how a node runs the request, not what it answers."""

IGNORED_FIELDS = frozenset({"stream", "keep_alive"})

CACHEABLE_KINDS = frozenset({JobKind.GENERATE, JobKind.CHAT})


def deterministic(body: dict[str, Any]) -> bool:
    """Whether Ollama answers ``body`` the same way every time (temperature 0 or a seed)."""
    options = body.get("options")
    if not isinstance(options, dict):
        return False
    temperature = options.get("temperature")
    if (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature == 0
    ):
        return True
    seed = options.get("seed")
    # A negative seed asks the sampler for a random one.
    return isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0


def cache_key(kind: JobKind, stream: bool, body: dict[str, Any]) -> str:
    """The canonical hash of ``body`` (model already resolved) for ``kind``."""
    kept = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    options = kept.get("options")
    if isinstance(options, dict):
        kept["options"] = {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}
    digest = hashlib.blake2b(digest_size=16)
    digest.update(VERSION)
    digest.update(b"s" if stream else b"1")
    digest.update(kind.value.encode())
    digest.update(orjson.dumps(kept, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()
