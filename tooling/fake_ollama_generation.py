"""The model endpoints: /api/generate, /api/chat, /api/embed and /api/embeddings."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from corral.tooling import fake_ollama_requests as req
from corral.tooling.fake_ollama_config import FakeOllamaConfig
from corral.tooling.fake_ollama_garbage import answer_bad_gateway, spoil
from corral.tooling.fake_ollama_models import now_rfc3339
from corral.tooling.fake_ollama_state import FakeOllama
from corral.tooling.fake_ollama_text import (
    ReplyPlan,
    context_ids,
    continued_tokens,
    echo_tokens,
    json_tokens,
    normalized_embedding,
    raw_embedding,
    thinking_tokens,
    tool_call,
    word_count,
)
from corral.tooling.fake_ollama_wire import ApiError, Exchange, NodeCrashedError

# Nominal prompt processing cost reported per prompt token; prompts are not simulated.
_PROMPT_EVAL_NS_PER_TOKEN = 100_000


@dataclass
class _Reply:
    """One generate/chat answer being delivered."""

    endpoint: str  # "generate" or "chat"
    model: str  # the model name as the client wrote it; Ollama echoes it back
    plan: ReplyPlan
    prompt_tokens: int
    received_ns: int
    load_ns: int
    context_prompt: str | None = None  # generate (non-raw) returns token ids as `context`
    garbage: str | None = None  # the kind of garbage to answer instead (fake_ollama_garbage)
    run: str = ""  # the request's fingerprint in the run registry


class _Pacer:
    """Spaces tokens at `token_rate`, re-read each token so runtime changes apply."""

    def __init__(self, config: FakeOllamaConfig) -> None:
        self._config = config
        self._last = time.monotonic()

    async def next(self) -> None:
        rate = self._config.token_rate
        if rate <= 0:
            return
        interval = 1.0 / rate
        now = time.monotonic()
        # Catch up on small oversleeps, but never burst after a long stall or a rate change.
        self._last = max(self._last + interval, now - interval)
        if self._last > now:
            await asyncio.sleep(self._last - now)


# Each handler sends its final answer only after leaving the slot: as in Ollama, the slot
# is free (and counted so) by the time the client sees the end of the answer.


async def handle_generate(fake: FakeOllama, ex: Exchange, body: dict[str, Any]) -> None:
    received_ns = time.time_ns()
    name, meta = req.require_model(fake, body)
    stream, opts, keep_alive = req.stream_flag(body), req.options(body), req.keep_alive(fake, body)
    prompt = req.optional_str(body, "prompt")
    if not prompt and keep_alive == 0:
        fake.scheduler.unload(meta.name)
        await ex.send_json(200, _status_reply("generate", name, "unload"))
        return
    if meta.embedding:
        raise ApiError(400, f'"{name}" does not support generate')
    plan = _plan(prompt, opts, req.wants_json(body), req.think_flag(body), None)
    garbage = None
    if prompt:
        await fake.inject_failure()
        garbage = await _garbage(fake, ex, meta.name, prompt)
    async with fake.slot(meta.name, opts.num_ctx, keep_alive) as lease:
        if not prompt:  # Ollama's way to load a model without generating
            final, stream = _status_reply("generate", name, "load"), False
        else:
            with fake.generating("/api/generate", meta.name, prompt, ex) as run:
                reply = _Reply(
                    "generate",
                    name,
                    plan,
                    prompt_tokens=max(1, word_count(prompt)),
                    received_ns=received_ns,
                    load_ns=int(lease.load_seconds * 1e9),
                    context_prompt=None if body.get("raw") else prompt,
                    garbage=garbage,
                    run=run,
                )
                final = await _generate(fake, ex, reply, stream)
    await _finish(ex, final, stream)


async def handle_chat(fake: FakeOllama, ex: Exchange, body: dict[str, Any]) -> None:
    received_ns = time.time_ns()
    name, meta = req.require_model(fake, body)
    stream, opts, keep_alive = req.stream_flag(body), req.options(body), req.keep_alive(fake, body)
    chat = req.messages(body)
    if not chat and keep_alive == 0:
        fake.scheduler.unload(meta.name)
        await ex.send_json(200, _status_reply("chat", name, "unload"))
        return
    if meta.embedding:
        raise ApiError(400, f'"{name}" does not support chat')
    prompt = req.last_user_content(chat)
    tool = req.first_tool_name(body)
    plan = _plan(prompt, opts, req.wants_json(body), req.think_flag(body), tool)
    unfinished = req.unfinished_answer(chat)
    rest = None
    if unfinished:
        # As Ollama does with a last assistant message: continue it, not answer anew.
        rest = continued_tokens(prompt, unfinished, opts.num_predict, req.wants_json(body))
        if rest is not None:
            plan = ReplyPlan(rest[0], rest[1])
    garbage = None
    if chat:
        await fake.inject_failure()
        garbage = await _garbage(fake, ex, meta.name, prompt)
    async with fake.slot(meta.name, opts.num_ctx, keep_alive) as lease:
        if not chat:
            final, stream = _status_reply("chat", name, "load"), False
        else:
            words = sum(word_count(str(m.get("content") or "")) for m in chat)
            continuing = rest is not None
            with fake.generating("/api/chat", meta.name, prompt, ex, continued=continuing) as run:
                reply = _Reply(
                    "chat",
                    name,
                    plan,
                    prompt_tokens=max(1, words),
                    received_ns=received_ns,
                    load_ns=int(lease.load_seconds * 1e9),
                    garbage=garbage,
                    run=run,
                )
                final = await _generate(fake, ex, reply, stream)
    await _finish(ex, final, stream)


async def handle_embed(fake: FakeOllama, ex: Exchange, body: dict[str, Any]) -> None:
    received_ns = time.time_ns()
    name, meta = req.require_model(fake, body)
    texts, dims = req.embed_inputs(body), req.dimensions(body)
    opts, keep_alive = req.options(body), req.keep_alive(fake, body)
    if texts:
        await fake.inject_failure()
    answer: dict[str, Any] = {"model": name, "embeddings": []}
    async with fake.slot(meta.name, opts.num_ctx, keep_alive) as lease:
        # An empty input only loads the model, as in Ollama.
        if texts:
            with fake.generating("/api/embed", meta.name, "\n".join(texts), ex):
                cfg = fake.config
                answer["embeddings"] = [
                    normalized_embedding(t, cfg.embedding_dim, cfg.seed, dims) for t in texts
                ]
                answer["total_duration"] = time.time_ns() - received_ns
                answer["load_duration"] = int(lease.load_seconds * 1e9)
                answer["prompt_eval_count"] = sum(max(1, word_count(t)) for t in texts)
    await ex.send_json(200, answer)


async def handle_embeddings(fake: FakeOllama, ex: Exchange, body: dict[str, Any]) -> None:
    """The legacy endpoint: one prompt, one vector, not normalised."""
    _, meta = req.require_model(fake, body)
    prompt = req.optional_str(body, "prompt")
    opts, keep_alive = req.options(body), req.keep_alive(fake, body)
    if prompt:
        await fake.inject_failure()
    vector: list[float] = []
    async with fake.slot(meta.name, opts.num_ctx, keep_alive):
        if prompt:
            with fake.generating("/api/embeddings", meta.name, prompt, ex):
                vector = raw_embedding(prompt, fake.config.embedding_dim, fake.config.seed)
    await ex.send_json(200, {"embedding": vector})


async def _garbage(fake: FakeOllama, ex: Exchange, model: str, prompt: str) -> str | None:
    """The garbage this prompt gets; a proxy's HTML page is answered here, before any slot."""
    kind = fake.garbage_for(prompt)
    if kind == "html":
        await answer_bad_gateway(fake, ex, model, prompt)
    return kind


def _plan(
    prompt: str, opts: req.Options, as_json: bool, think: bool, tool: str | None
) -> ReplyPlan:
    thinking = thinking_tokens(prompt) if think else []
    if tool is not None:
        return ReplyPlan([], "stop", thinking, [tool_call(tool, prompt)])
    make = json_tokens if as_json else echo_tokens
    content, done_reason = make(prompt, opts.num_predict)
    return ReplyPlan(content, done_reason, thinking)


async def _generate(fake: FakeOllama, ex: Exchange, reply: _Reply, stream: bool) -> dict[str, Any]:
    """Produce the tokens (sending them when streaming); returns the closing object."""
    plan = reply.plan
    pieces = [("thinking", t) for t in plan.thinking] + [("content", c) for c in plan.content]
    if plan.tool_calls:
        pieces.append(("tools", ""))
    pacer = _Pacer(fake.config)
    eval_started = time.monotonic_ns()
    spoil_at = fake.config.garbage_after_tokens if reply.garbage is not None else None
    for emitted, (kind, piece) in enumerate(pieces):
        await pacer.next()
        _crash_if_due(fake, ex, emitted)
        if stream and reply.garbage is not None and emitted == spoil_at:
            await spoil(fake, ex, reply.run, reply.garbage, None)
        if stream:
            await ex.send_line(_chunk(reply, kind, piece))
    _crash_if_due(fake, ex, len(pieces))
    stats = _timings(reply, len(pieces), time.monotonic_ns() - eval_started)
    final = _final(reply, stats, full=not stream)
    if reply.garbage is not None:  # a short answer, or one not streamed: spoil its end
        await spoil(fake, ex, reply.run, reply.garbage, None if stream else final)
    return final


async def _finish(ex: Exchange, final: dict[str, Any], stream: bool) -> None:
    if stream:
        await ex.send_last_line(final)
    else:
        await ex.send_json(200, final)


def _crash_if_due(fake: FakeOllama, ex: Exchange, emitted: int) -> None:
    limit = fake.config.crash_after_tokens
    if limit is None or emitted < limit:
        return
    # Counted before the connection drops, so the count is there when the client notices.
    fake.counters.add("failed", ex.model)
    if not ex.abort():
        # No transport to kill (an in-process ASGI client): an exception is the nearest thing.
        raise RuntimeError("fake Ollama node crashed (crash_after_tokens)")
    raise NodeCrashedError


def _chunk(reply: _Reply, kind: str, piece: str) -> dict[str, Any]:
    head: dict[str, Any] = {"model": reply.model, "created_at": now_rfc3339()}
    content = piece if kind == "content" else ""
    if reply.endpoint == "generate":
        head["response"] = content
        if kind == "thinking":
            head["thinking"] = piece
    else:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if kind == "thinking":
            message["thinking"] = piece
        if kind == "tools":
            message["tool_calls"] = reply.plan.tool_calls
        head["message"] = message
    head["done"] = False
    return head


def _final(reply: _Reply, stats: dict[str, int], *, full: bool) -> dict[str, Any]:
    """The closing object; with `full` (stream: false) it carries the whole answer."""
    plan = reply.plan
    text = "".join(plan.content)
    thinking = "".join(plan.thinking)
    out: dict[str, Any] = {"model": reply.model, "created_at": now_rfc3339()}
    if reply.endpoint == "generate":
        out["response"] = text if full else ""
        if full and thinking:
            out["thinking"] = thinking
    else:
        message: dict[str, Any] = {"role": "assistant", "content": text if full else ""}
        if full and thinking:
            message["thinking"] = thinking
        if full and plan.tool_calls:
            message["tool_calls"] = plan.tool_calls
        out["message"] = message
    out["done"] = True
    out["done_reason"] = plan.done_reason
    if reply.context_prompt is not None:
        out["context"] = context_ids(f"{reply.context_prompt} {text}")
    out.update(stats)
    return out


def _timings(reply: _Reply, eval_count: int, eval_ns: int) -> dict[str, int]:
    return {
        "total_duration": time.time_ns() - reply.received_ns,
        "load_duration": reply.load_ns,
        "prompt_eval_count": reply.prompt_tokens,
        "prompt_eval_duration": reply.prompt_tokens * _PROMPT_EVAL_NS_PER_TOKEN,
        "eval_count": eval_count,
        # Never 0: clients divide by it to get tokens per second.
        "eval_duration": max(eval_ns, 1),
    }


def _status_reply(endpoint: str, model: str, reason: str) -> dict[str, Any]:
    """The answer to a load-only or unload request."""
    out: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    if endpoint == "generate":
        out["response"] = ""
    else:
        out["message"] = {"role": "assistant", "content": ""}
    out["done"] = True
    out["done_reason"] = reason
    return out
