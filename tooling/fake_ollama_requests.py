"""Parsing and validating Ollama API request bodies, with Ollama's error messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from corral.tooling.fake_ollama_models import ModelMeta, parse_keep_alive
from corral.tooling.fake_ollama_state import FakeOllama
from corral.tooling.fake_ollama_wire import ApiError


@dataclass(frozen=True)
class Options:
    num_predict: int | None
    num_ctx: int | None


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"invalid JSON in request body: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid request body: expected a JSON object")
    return value


def model_field(body: dict[str, Any], *aliases: str) -> str:
    """The requested model name, as given; `aliases` are deprecated names such as `name`."""
    for key in ("model", *aliases):
        value = body.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise ApiError(400, f"{key} must be a string")
        return value
    raise ApiError(400, "model is required")


def require_model(fake: FakeOllama, body: dict[str, Any]) -> tuple[str, ModelMeta]:
    name = model_field(body)
    meta = fake.find_model(name)
    if meta is None:
        raise ApiError(404, f'model "{name}" not found, try pulling it first')
    return name, meta


def stream_flag(body: dict[str, Any]) -> bool:
    value = body.get("stream")
    if value is None:
        return True  # Ollama streams unless told otherwise
    if not isinstance(value, bool):
        raise ApiError(400, "stream must be a boolean")
    return value


def options(body: dict[str, Any]) -> Options:
    raw = body.get("options")
    if raw is None:
        return Options(None, None)
    if not isinstance(raw, dict):
        raise ApiError(400, "options must be an object")
    num_predict = _optional_int(raw, "num_predict")
    num_ctx = _optional_int(raw, "num_ctx")
    return Options(
        # Negative num_predict means "no limit" (-1) or "fill the context" (-2).
        num_predict=num_predict if num_predict is not None and num_predict >= 0 else None,
        num_ctx=num_ctx if num_ctx is not None and num_ctx > 0 else None,
    )


def keep_alive(fake: FakeOllama, body: dict[str, Any]) -> float | None:
    try:
        return parse_keep_alive(body.get("keep_alive"), fake.config.keep_alive)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def optional_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{key} must be a string")
    return value


def wants_json(body: dict[str, Any]) -> bool:
    """`format: "json"` or a JSON schema both ask for JSON output."""
    value = body.get("format")
    if value is None or value == "":
        return False
    if value == "json" or isinstance(value, dict):
        return True
    shown = orjson.dumps(value).decode()
    raise ApiError(400, f'invalid format: {shown}; expected "json" or a JSON schema')


def think_flag(body: dict[str, Any]) -> bool:
    value = body.get("think")
    if isinstance(value, str):  # gpt-oss style levels: "low", "medium", "high"
        return value.lower() not in ("", "false", "none")
    return bool(value)


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    value = body.get("messages")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ApiError(400, "messages must be a list of objects")
    for item in value:
        if not isinstance(item.get("content", ""), str | None):
            raise ApiError(400, "message content must be a string")
    return value


def last_user_content(chat: list[dict[str, Any]]) -> str:
    for message in reversed(chat):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return str(chat[-1].get("content") or "") if chat else ""


def unfinished_answer(chat: list[dict[str, Any]]) -> str | None:
    """The content of a last ``assistant`` message: an answer Ollama is asked to continue."""
    if chat and chat[-1].get("role") == "assistant" and not chat[-1].get("tool_calls"):
        return str(chat[-1].get("content") or "")
    return None


def first_tool_name(body: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list) or not isinstance(tools[0], dict):
        raise ApiError(400, "tools must be a list of objects")
    function = tools[0].get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else "tool"


def embed_inputs(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ApiError(400, "invalid input type")


def dimensions(body: dict[str, Any]) -> int | None:
    value = body.get("dimensions")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, "dimensions must be a non-negative integer")
    return value or None


def _optional_int(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ApiError(400, f"option {key!r} must be an integer")
    return int(value)
