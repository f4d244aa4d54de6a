"""OpenAI's API, served from the fleet: chat completions, completions, embeddings, models.

Each request is checked and translated into the Ollama request of a ``chat``,
``generate`` or ``embed`` job, as Ollama's compatibility layer translates it, and goes
down the same job path as the Ollama routes; only the dialect that writes the answer
differs (``corral.gateway.openai_dialect``). Errors are answered in OpenAI's shape.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response

from corral.errors import BadRequest, ModelNotFound
from corral.gateway.admission import Incoming, make_spec, read_request, relay
from corral.gateway.auth import route
from corral.gateway.dialect import Dialect
from corral.gateway.ollama_schema import Body
from corral.gateway.openai_dialect import (
    ChatDialect,
    CompletionDialect,
    EmbeddingDialect,
    Json,
    model_object,
    ollama_tool_calls,
    tool_name_for,
)
from corral.gateway.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from corral.gateway.state import state_of
from corral.gateway.validation import check
from corral.keys import JobKind
from corral.names import normalize_model
from corral.tenants import Scope

JSON = "application/json; charset=utf-8"
_IMAGE_URL = re.compile(r"data:(?:image/(?:jpeg|jpg|png|webp))?;base64,(.*)", re.DOTALL)
_NUMBER_OPTIONS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")


@dataclass(frozen=True, slots=True)
class Translated:
    """An OpenAI request as the Ollama request a worker runs, and how to answer it."""

    body: Json
    model: str
    """The model as the client named it: what answers report, as with Ollama."""
    stream: bool = False
    include_usage: bool = False
    encoding: str = "float"


# --- routes ---


async def chat_completions(request: Request) -> Response:
    return await _openai_job(request, JobKind.CHAT, chat_request)


async def completions(request: Request) -> Response:
    return await _openai_job(request, JobKind.GENERATE, completion_request)


async def embeddings(request: Request) -> Response:
    return await _openai_job(request, JobKind.EMBED, embedding_request)


async def _openai_job(
    request: Request, kind: JobKind, translate: Callable[[Json], Translated]
) -> Response:
    """Translate, then admit and relay exactly as an Ollama request (nothing queued on 4xx)."""
    incoming = await read_request(request)
    ask = translate(incoming.body)
    ollama = Incoming(incoming.state, ask.body, incoming.principal)
    spec = await make_spec(request, ollama, kind, stream=ask.stream)
    return await relay(request, spec, _dialect(kind, ask, spec.job_id), body=ask.body)


def _dialect(kind: JobKind, ask: Translated, job_id: str) -> Dialect:
    """The writer of this request's answer; completion ids carry the job id."""
    if kind is JobKind.CHAT:
        return ChatDialect(f"chatcmpl-{job_id}", ask.model, include_usage=ask.include_usage)
    if kind is JobKind.GENERATE:
        return CompletionDialect(f"cmpl-{job_id}", ask.model, include_usage=ask.include_usage)
    return EmbeddingDialect(ask.model, encoding=ask.encoding)


async def list_models(request: Request) -> Response:
    state = state_of(request)
    models = state.fleet.current.models()
    data = [model_object(name, models[name]) for name in sorted(models)]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type=JSON)


async def retrieve_model(request: Request) -> Response:
    state = state_of(request)
    name = str(request.path_params["model"])
    model = normalize_model(name)
    if not model or not await state.fleet.has_model(model):
        raise ModelNotFound(name)
    entry = state.fleet.current.models().get(model, {})
    return Response(orjson.dumps(model_object(name, entry)), media_type=JSON)


ROUTES = [
    route("/v1/chat/completions", chat_completions, methods=["POST"], scope=Scope.USER),
    route("/v1/completions", completions, methods=["POST"], scope=Scope.USER),
    route("/v1/embeddings", embeddings, methods=["POST"], scope=Scope.USER),
    route("/v1/models", list_models, methods=["GET"], scope=Scope.USER),
    route("/v1/models/{model:path}", retrieve_model, methods=["GET"], scope=Scope.USER),
]

BODIES: dict[str, type[Body]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
"""The declared body of each route that takes one (published by ``GET /openapi.json``)."""


# --- requests: OpenAI in, Ollama out ---
#
# Each body is first checked against its model (``corral.gateway.openai_schema``); the
# translation then reads the body as sent, so numbers keep their JSON form (a
# ``temperature`` of 1 stays 1) and the Ollama request is what Ollama's layer would build.


def chat_request(body: Json) -> Translated:
    check(ChatCompletionRequest, body)
    model, stream, include_usage = _common(body)
    chat = body["messages"]
    out: Json = {"model": model, "messages": [_message(i, m, chat) for i, m in enumerate(chat)]}
    out["options"] = _options(body)
    if (fmt := _format(body.get("response_format"))) is not None:
        out["format"] = fmt
    if body.get("tools") is not None:
        out["tools"] = body["tools"]
    if (think := _think(body)) is not None:
        out["think"] = think
    return Translated(out, model, stream, include_usage)


def completion_request(body: Json) -> Translated:
    check(CompletionRequest, body)
    model, stream, include_usage = _common(body)
    out: Json = {"model": model, "prompt": body["prompt"], "options": _options(body)}
    if body.get("suffix") is not None:
        out["suffix"] = body["suffix"]
    return Translated(out, model, stream, include_usage)


def embedding_request(body: Json) -> Translated:
    check(EmbeddingRequest, body)
    model = body["model"]
    value = body["input"]
    encoding = body.get("encoding_format") or "float"
    if encoding.lower() not in ("float", "base64"):
        raise BadRequest(
            f"Invalid value for 'encoding_format' = {encoding}. "
            "Supported values: ['float', 'base64']."
        )
    out: Json = {"model": model, "input": [value] if isinstance(value, str) else value}
    if body.get("dimensions") is not None:
        out["dimensions"] = body["dimensions"]
    return Translated(out, model, encoding=encoding.lower())


def _common(body: Json) -> tuple[str, bool, bool]:
    """The model, whether to stream (OpenAI's default: no) and ``include_usage``."""
    stream_options = body.get("stream_options") or {}
    return body["model"], body.get("stream") is True, stream_options.get("include_usage") is True


def _options(body: Json) -> Json:
    """Sampling parameters as Ollama options (OpenAI's temperature and top_p default to 1)."""
    options: Json = {"temperature": 1.0, "top_p": 1.0}
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    limit = body.get("max_completion_tokens")
    limit = body.get("max_tokens") if limit is None else limit
    if limit is not None:
        options["num_predict"] = limit
    if body.get("seed") is not None:
        options["seed"] = body["seed"]
    for field in _NUMBER_OPTIONS:
        if body.get(field) is not None:
            options[field] = body[field]
    return options


def _format(value: Json | None) -> str | Json | None:
    """``response_format`` as Ollama's ``format``: ``"json"`` or a JSON schema."""
    if value is None or value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return "json"
    schema: Json = value["json_schema"]["schema"]
    return schema


def _think(body: Json) -> bool | str | None:
    """``reasoning_effort`` (or ``reasoning.effort``) as Ollama's ``think``."""
    reasoning = body.get("reasoning") or {}
    effort = reasoning.get("effort") or body.get("reasoning_effort")
    if effort is None:
        return None
    return False if effort == "none" else str(effort)


def _message(index: int, message: Json, chat: list[Json]) -> Json:
    out: Json = {"role": message["role"]}
    content, calls = message.get("content"), message.get("tool_calls")
    if isinstance(content, str):
        out["content"] = content
    elif isinstance(content, list):
        out["content"], images = _parts(index, content)
        if images:
            out["images"] = images
    elif calls:
        out["content"] = ""  # content is optional only beside tool calls
    else:
        raise BadRequest(
            f"messages[{index}].content is required (it may be left out only beside tool_calls)"
        )
    if calls is not None:
        out["tool_calls"] = ollama_tool_calls(index, calls)
    if isinstance(message.get("reasoning"), str):
        out["thinking"] = message["reasoning"]
    if message["role"] == "tool":
        name = message.get("name") or tool_name_for(chat, message.get("tool_call_id"))
        if name:
            out["tool_name"] = name
    return out


def _parts(index: int, parts: list[Json]) -> tuple[str, list[str]]:
    """Text parts joined by newlines, and the base64 data of each image part."""
    texts = [part["text"] for part in parts if part["type"] == "text"]
    images = [_image(index, part["image_url"]) for part in parts if part["type"] == "image_url"]
    return "\n".join(texts), images


def _image(index: int, value: str | Json) -> str:
    url = value["url"] if isinstance(value, dict) else value
    found = _IMAGE_URL.fullmatch(url)
    if found is None:
        raise BadRequest(f"invalid 'messages[{index}].content': images must be base64 data URIs")
    try:
        base64.b64decode(found.group(1), validate=True)
    except binascii.Error as exc:
        raise BadRequest(f"invalid 'messages[{index}].content': invalid base64 image data") from exc
    return found.group(1)
