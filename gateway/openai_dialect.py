"""OpenAI's wire format on Corral's one job path.

The OpenAI routes (``corral.gateway.routes.openai``) translate a request into the Ollama request
a worker runs; the dialects here turn that job's Ollama replies into OpenAI objects, as
Ollama's own compatibility layer does: ``chat.completion`` and ``text_completion``
answers, server-sent ``chat.completion.chunk`` events ending in ``data: [DONE]``,
embedding lists and model objects. One dialect instance serves one request. Tool calls
are converted here both ways: OpenAI's arguments are a JSON string, Ollama's an object.
"""

from __future__ import annotations

import base64
import secrets
import struct
import time
from datetime import datetime
from typing import Any

import orjson

from corral.errors import BadRequest
from corral.gateway.dialect import openai_error

FINGERPRINT = "fp_ollama"
DONE_FRAME = b"data: [DONE]\n\n"

Json = dict[str, Any]


def sse(value: Any) -> bytes:
    """One server-sent event carrying ``value`` as JSON."""
    return b"data: " + orjson.dumps(value) + b"\n\n"


def usage(answer: Json) -> Json:
    prompt = int(answer.get("prompt_eval_count") or 0)
    completion = int(answer.get("eval_count") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def tool_call_id() -> str:
    return "call_" + secrets.token_hex(4)


def finish_reason(done_reason: Any, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def model_object(name: str, entry: Json) -> Json:
    """A model as Ollama's compatibility layer lists it; the owner is its namespace."""
    path = name.split("/")  # [host/][namespace/]model[:tag]
    return {
        "id": name,
        "object": "model",
        "created": _unix(entry.get("modified_at")),
        "owned_by": path[-2] if len(path) > 1 else "library",
    }


def _unix(stamp: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(stamp)).timestamp())
    except ValueError:
        return 0


class _OpenAIDialect:
    """What every OpenAI answer shares: its id, model, creation time and error shape."""

    stream_media_type = "text/event-stream"
    object_name = ""
    name = "openai"

    def __init__(self, completion_id: str, model: str, *, include_usage: bool = False) -> None:
        self.id = completion_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def stream_error(self, message: str, status: int) -> bytes:
        return b"data: " + openai_error(message, status) + b"\n\n"

    def error_body(self, message: str, status: int) -> bytes:
        return openai_error(message, status)

    def _head(self, object_name: str) -> Json:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
        }

    def _event(self, choices: list[Json]) -> bytes:
        value = {**self._head(self.object_name), "choices": choices}
        if self.include_usage:
            value["usage"] = None  # as OpenAI: every chunk but the usage one has null
        return sse(value)

    def _ending(self, answer: Json) -> bytes:
        """The usage event (when asked for) and ``[DONE]``."""
        if not self.include_usage:
            return DONE_FRAME
        value = {**self._head(self.object_name), "choices": [], "usage": usage(answer)}
        return sse(value) + DONE_FRAME


class ChatDialect(_OpenAIDialect):
    """``/v1/chat/completions``: chat jobs as ``chat.completion`` objects or chunks."""

    object_name = "chat.completion.chunk"

    def __init__(self, completion_id: str, model: str, *, include_usage: bool = False) -> None:
        super().__init__(completion_id, model, include_usage=include_usage)
        self._started = False
        self._tool_calls = 0

    def chunk(self, payload: bytes) -> bytes:
        delta = self._delta(_message(orjson.loads(payload)))
        if not delta:
            return b""
        return self._event([{"index": 0, "delta": delta, "finish_reason": None}])

    def last(self, payload: bytes) -> bytes:
        answer = orjson.loads(payload)
        delta = self._delta(_message(answer))
        reason = finish_reason(answer.get("done_reason"), self._tool_calls > 0)
        event = self._event([{"index": 0, "delta": delta, "finish_reason": reason}])
        return event + self._ending(answer)

    def single(self, payload: bytes) -> bytes:
        answer = orjson.loads(payload)
        message = _message(answer)
        calls = message.get("tool_calls") or []
        reply: Json = {"role": "assistant", "content": str(message.get("content") or "")}
        if message.get("thinking"):
            reply["reasoning"] = message["thinking"]
        if calls:
            reply["tool_calls"] = [_tool_call(call) for call in calls]
        choice = {
            "index": 0,
            "message": reply,
            "finish_reason": finish_reason(answer.get("done_reason"), bool(calls)),
            "logprobs": None,
        }
        head = self._head("chat.completion")
        return orjson.dumps({**head, "choices": [choice], "usage": usage(answer)})

    def _delta(self, message: Json) -> Json:
        """What this chunk adds; the first one names the role, as OpenAI's does."""
        delta: Json = {}
        if not self._started:
            self._started = True
            delta = {"role": "assistant", "content": ""}
        if message.get("content"):
            delta["content"] = message["content"]
        if message.get("thinking"):
            delta["reasoning"] = message["thinking"]
        calls = message.get("tool_calls")
        if calls:
            delta["tool_calls"] = [self._indexed(call) for call in calls]
        return delta

    def _indexed(self, call: Json) -> Json:
        out = {"index": self._tool_calls, **_tool_call(call)}
        self._tool_calls += 1
        return out


class CompletionDialect(_OpenAIDialect):
    """``/v1/completions``: generate jobs as ``text_completion`` objects or chunks."""

    object_name = "text_completion"

    def chunk(self, payload: bytes) -> bytes:
        text = orjson.loads(payload).get("response")
        if not text:
            return b""
        return self._event([_text_choice(str(text), None)])

    def last(self, payload: bytes) -> bytes:
        answer = orjson.loads(payload)
        reason = finish_reason(answer.get("done_reason"), False)
        event = self._event([_text_choice(str(answer.get("response") or ""), reason)])
        return event + self._ending(answer)

    def single(self, payload: bytes) -> bytes:
        answer = orjson.loads(payload)
        reason = finish_reason(answer.get("done_reason"), False)
        choice = _text_choice(str(answer.get("response") or ""), reason)
        head = self._head(self.object_name)
        return orjson.dumps({**head, "choices": [choice], "usage": usage(answer)})


class EmbeddingDialect(_OpenAIDialect):
    """``/v1/embeddings``: an embed job's vectors as an OpenAI embedding list."""

    stream_media_type = "application/json"

    def __init__(self, model: str, *, encoding: str = "float") -> None:
        super().__init__("", model)
        self.base64 = encoding == "base64"

    def chunk(self, payload: bytes) -> bytes:
        return b""  # embed jobs never stream

    def last(self, payload: bytes) -> bytes:
        return self.single(payload)

    def single(self, payload: bytes) -> bytes:
        answer = orjson.loads(payload)
        vectors = answer.get("embeddings") or []
        data = [
            {"object": "embedding", "embedding": self._encode(vector), "index": index}
            for index, vector in enumerate(vectors)
        ]
        tokens = int(answer.get("prompt_eval_count") or 0)
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": self.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _encode(self, vector: list[float]) -> list[float] | str:
        if not self.base64:
            return vector
        packed = struct.pack(f"<{len(vector)}f", *vector)  # little-endian float32, as OpenAI
        return base64.b64encode(packed).decode()


def _message(answer: Json) -> Json:
    message = answer.get("message")
    return message if isinstance(message, dict) else {}


def _tool_call(call: Json) -> Json:
    """Ollama's tool call (arguments an object) as OpenAI's (arguments a JSON string)."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    return {
        "id": call.get("id") or tool_call_id(),
        "type": "function",
        "function": {
            "name": str(function.get("name") or ""),
            "arguments": orjson.dumps(arguments if arguments is not None else {}).decode(),
        },
    }


def _text_choice(text: str, reason: str | None) -> Json:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}


def ollama_tool_calls(index: int, calls: list[Json]) -> list[Json]:
    """OpenAI's tool calls of message ``index`` (already checked against their model) as
    Ollama's: OpenAI's arguments are a JSON string, Ollama's an object."""
    out: list[Json] = []
    for call in calls:
        function = call["function"]
        arguments = function.get("arguments") or "{}"
        try:
            parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise BadRequest(
                f"invalid 'messages[{index}].tool_calls': arguments must be a JSON object"
            )
        out.append({"function": {"name": function["name"], "arguments": parsed}})
    return out


def tool_name_for(chat: list[Any], call_id: Any) -> str | None:
    """The function a ``tool`` message answers, found by its call id (the last one wins)."""
    if not call_id:
        return None
    for message in reversed(chat):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict) and call.get("id") == call_id:
                function = call.get("function")
                name = function.get("name") if isinstance(function, dict) else None
                return name if isinstance(name, str) and name else None
    return None
