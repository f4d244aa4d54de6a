"""Deterministic "model output": echo replies, tool calls and embedding vectors."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

_PIECE_RE = re.compile(r"\S+\s*")


@dataclass
class ReplyPlan:
    """The tokens one generate/chat answer will produce, in order."""

    content: list[str]
    done_reason: str = "stop"
    thinking: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] | None = None

    @property
    def token_count(self) -> int:
        return len(self.thinking) + len(self.content) + (1 if self.tool_calls else 0)


def word_count(text: str) -> int:
    return len(text.split())


def echo_tokens(prompt: str, num_predict: int | None) -> tuple[list[str], str]:
    """The words of "echo: <prompt>", one token each, spaced so they join back into the text.

    With num_predict the answer has exactly that many tokens, cycling the words, and is
    reported as cut ("length") unless it happens to be exactly the natural answer.
    """
    words = f"echo: {prompt}".split()
    if num_predict is None:
        return _spaced(words), "stop"
    chosen = [words[i % len(words)] for i in range(num_predict)]
    return _spaced(chosen), "stop" if num_predict == len(words) else "length"


def json_tokens(prompt: str, num_predict: int | None) -> tuple[list[str], str]:
    """`{"echo": "<prompt>"}` in pieces; num_predict can only cut it (JSON cannot cycle)."""
    pieces = _PIECE_RE.findall(json.dumps({"echo": prompt}))
    if num_predict is not None and num_predict < len(pieces):
        return pieces[:num_predict], "length"
    return pieces, "stop"


def continued_tokens(
    prompt: str, partial: str, num_predict: int | None, as_json: bool
) -> tuple[list[str], str] | None:
    """The rest of the answer to ``prompt`` after ``partial``, as Ollama continues a chat
    whose last message is the assistant's unfinished answer: ``num_predict`` counts only
    the new tokens. None when ``partial`` is not how this fake's answer begins."""
    make = json_tokens if as_json else echo_tokens
    for k in range(len(partial) + 1):
        total = None if num_predict is None else k + num_predict
        tokens, reason = make(prompt, total)
        if len(tokens) < k:
            return None
        if "".join(tokens[:k]) == partial:
            return tokens[k:], reason
    return None


def thinking_tokens(prompt: str) -> list[str]:
    return _spaced(f"thinking: {prompt}".split())


def tool_call(name: str, query: str) -> dict[str, Any]:
    return {"function": {"name": name, "arguments": {"query": query}}}


def context_ids(text: str) -> list[int]:
    """Stand-in token ids for generate's `context`: stable per word, in Ollama's id range."""
    return [zlib.crc32(word.encode()) % 128_000 for word in text.split()]


def raw_embedding(text: str, dim: int, seed: int) -> list[float]:
    """A vector that depends only on (text, dim, seed); what the legacy endpoint returns."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return [rng.gauss(0.0, 1.0) for _ in range(dim)]


def normalized_embedding(text: str, dim: int, seed: int, dimensions: int | None) -> list[float]:
    """Like /api/embed: optionally truncated to `dimensions`, then scaled to unit length."""
    vector = raw_embedding(text, dim, seed)
    if dimensions is not None and 0 < dimensions < dim:
        vector = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _spaced(words: list[str]) -> list[str]:
    return [word + " " for word in words[:-1]] + words[-1:]
