"""Per-endpoint checks of Ollama request bodies, before anything is enqueued.

Only the shape is checked here (JSON types of the fields Ollama reads); what the
values mean is the node's business, and its errors come back with their status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.errors import BadRequest
from corral.gateway.inputs import expect
from corral.keys import JobKind

_STR = (str,)
_BOOL = (bool,)
_OBJ = (dict,)
_LIST = (list,)
_FORMAT = (str, dict)
_KEEP_ALIVE = (str, int, float)
_THINK = (bool, str)


def _common(body: dict[str, Any]) -> None:
    expect(body, "stream", _BOOL, "a boolean")
    expect(body, "options", _OBJ, "an object")
    expect(body, "format", _FORMAT, 'a string ("json") or a JSON schema object')
    expect(body, "keep_alive", _KEEP_ALIVE, 'a duration ("5m") or seconds')
    expect(body, "think", _THINK, "a boolean or a level")


def check_generate(body: dict[str, Any]) -> None:
    _common(body)
    for field in ("prompt", "suffix", "system", "template"):
        expect(body, field, _STR, "a string")
    expect(body, "raw", _BOOL, "a boolean")
    expect(body, "context", _LIST, "a list of integers")
    expect(body, "images", _LIST, "a list of base64 strings")


def check_chat(body: dict[str, Any]) -> None:
    _common(body)
    expect(body, "tools", _LIST, "a list of tools")
    messages = body.get("messages")
    if messages is None:
        return  # Ollama loads the model and answers an empty chat
    if not isinstance(messages, list):
        raise BadRequest("invalid 'messages': expected a list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"invalid message {index}: expected an object")
        if not isinstance(message.get("role"), str):
            raise BadRequest(f"invalid message {index}: 'role' must be a string")
        for field, kinds, what in (
            ("content", _STR, "a string"),
            ("images", _LIST, "a list of base64 strings"),
            ("tool_calls", _LIST, "a list"),
        ):
            if message.get(field) is not None and not isinstance(message[field], kinds):
                raise BadRequest(f"invalid message {index}: {field!r} must be {what}")


def check_embed(body: dict[str, Any]) -> None:
    expect(body, "options", _OBJ, "an object")
    expect(body, "keep_alive", _KEEP_ALIVE, 'a duration ("5m") or seconds')
    expect(body, "truncate", _BOOL, "a boolean")
    expect(body, "dimensions", (int,), "an integer")
    value = body.get("input")
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRequest("invalid 'input': expected a string or a list of strings")


def check_embeddings(body: dict[str, Any]) -> None:
    expect(body, "options", _OBJ, "an object")
    expect(body, "keep_alive", _KEEP_ALIVE, 'a duration ("5m") or seconds')
    expect(body, "prompt", _STR, "a string")


CHECKS: dict[JobKind, Callable[[dict[str, Any]], None]] = {
    JobKind.GENERATE: check_generate,
    JobKind.CHAT: check_chat,
    JobKind.EMBED: check_embed,
    JobKind.EMBEDDINGS: check_embeddings,
}
