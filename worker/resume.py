"""Continuing a streamed answer that another node started and did not finish.

When a node dies (or its Ollama fails) after part of a streamed answer reached the
client, the job goes back to the queue instead of failing (``CORRAL_RESUME_STREAMS``).
The node that claims it next reads the chunks already sent (the job's output list, the
same list a gateway replays from) and asks its Ollama to continue:

* chat: the partial answer becomes a last ``assistant`` message, which Ollama continues
  rather than answering anew;
* generate: the equivalent chat (``system``, then the prompt as the user's message with
  its images, then the partial answer), its chunks turned back into generate chunks;
  a ``raw`` generate instead gets the partial answer appended to its prompt.

``num_predict`` is lowered by the tokens already sent. Only new chunks are streamed, their
sequence numbers following on, so the client reads one unbroken answer; the final chunk's
``eval_count`` is the sum of both attempts' (one chunk is one token). Durations and
``prompt_eval_count`` are the last attempt's: the first attempt's died with its node.

An answer longer than its replay list (``CORRAL_REPLAY_MAX_MESSAGES`` chunks) is not
continued: the list no longer says where the client is (``CannotContinue``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from corral import protocol
from corral.errors import BackendError
from corral.keys import JobKind


class CannotContinue(BackendError):
    """The answer passed its replay cap before its node stopped: no node can continue it
    (a failure of the job, not of the node that found out)."""

    def __init__(self, sent: int) -> None:
        super().__init__(
            f"the node streaming this answer stopped past the {sent} chunks Corral keeps to "
            "continue an answer (CORRAL_REPLAY_MAX_MESSAGES): the rest cannot be continued "
            "on another node",
            503,
            retriable=False,
        )


@dataclass(slots=True)
class Partial:
    """What the client already has of an answer."""

    chunks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.chunks)

    def text(self, kind: JobKind) -> str:
        if kind is JobKind.CHAT:
            return "".join(str((c.get("message") or {}).get("content") or "") for c in self.chunks)
        return "".join(str(c.get("response") or "") for c in self.chunks)


def read_partial(messages: list[bytes | str]) -> Partial:
    """The chunks of an output list, in sequence order, each once, up to the first gap."""
    by_seq: dict[int, dict[str, Any]] = {}
    for raw in messages:
        reply = protocol.decode(raw.encode() if isinstance(raw, str) else raw)
        if reply.type != protocol.CHUNK:
            continue
        chunk = orjson.loads(reply.payload)
        if isinstance(chunk, dict):
            by_seq.setdefault(reply.seq, chunk)
    chunks: list[dict[str, Any]] = []
    while len(chunks) in by_seq:
        chunks.append(by_seq[len(chunks)])
    return Partial(chunks)


@dataclass(slots=True)
class Continuation:
    """How to ask for the rest of an answer, and how to read what comes back."""

    path: str
    request: bytes
    as_generate: bool
    """Chat chunks to be turned back into generate chunks."""


def continuation(kind: JobKind, request: bytes, partial: Partial) -> Continuation:
    body = orjson.loads(request)
    text = partial.text(kind)
    options = dict(body.get("options") or {})
    limit = options.get("num_predict")
    if isinstance(limit, int) and limit > 0:
        options["num_predict"] = max(limit - partial.sent, 0)
    if options:
        body["options"] = options
    if kind is JobKind.CHAT:
        messages = list(body.get("messages") or [])
        messages.append({"role": "assistant", "content": text})
        body["messages"] = messages
        return Continuation(JobKind.CHAT.path, orjson.dumps(body), as_generate=False)
    if body.get("raw"):
        body["prompt"] = str(body.get("prompt") or "") + text
        return Continuation(JobKind.GENERATE.path, orjson.dumps(body), as_generate=False)
    user: dict[str, Any] = {"role": "user", "content": str(body.get("prompt") or "")}
    if body.get("images"):
        user["images"] = body["images"]
    chat = [{"role": "system", "content": body["system"]}] if body.get("system") else []
    chat += [user, {"role": "assistant", "content": text}]
    keep = ("model", "format", "options", "keep_alive", "think", "stream")
    rest = {k: body[k] for k in keep if k in body}
    return Continuation(
        JobKind.CHAT.path, orjson.dumps({**rest, "messages": chat}), as_generate=True
    )


def as_generate_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """A chat chunk of a continued generate, as the generate chunk it stands for."""
    message = chunk.pop("message", None) or {}
    out = {"model": chunk.pop("model", ""), "created_at": chunk.pop("created_at", "")}
    out["response"] = str(message.get("content") or "")
    if message.get("thinking"):
        out["thinking"] = message["thinking"]
    out.update(chunk)
    return out


def summed_final(final: dict[str, Any], partial: Partial) -> dict[str, Any]:
    """The last chunk with the first attempt's tokens counted in.

    The first attempt's generation time is not known (its node died before its final
    chunk), so ``eval_duration`` is this attempt's, scaled to the whole count at this
    attempt's speed, and ``total_duration`` grows by the same: a client computing tokens/s
    from ``eval_count / eval_duration`` reads the speed the answer was generated at, not a
    rate inflated by tokens counted without their time."""
    count, spent = final.get("eval_count"), final.get("eval_duration")
    if not isinstance(count, int):
        return final
    final["eval_count"] = count + partial.sent
    if count > 0 and isinstance(spent, int | float) and spent > 0:
        extra = int(spent * partial.sent / count)
        final["eval_duration"] = int(spent) + extra
        total = final.get("total_duration")
        if isinstance(total, int | float):
            final["total_duration"] = int(total) + extra
    return final
