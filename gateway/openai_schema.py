"""The OpenAI request bodies Corral accepts, declared once: what is checked and published.

Each ``/v1`` endpoint's body is a ``msgspec.Struct`` (see ``corral.gateway.validation``);
once a body has passed, ``corral.gateway.routes.openai`` translates it into the Ollama
request a worker runs, as Ollama's compatibility layer does. Fields Corral does not
translate are allowed and ignored, as Ollama ignores them. What is left to the
translation is meaning, not type: data URIs, tool-call arguments that must parse as JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from corral.gateway.ollama_schema import Body

Effort = Literal["high", "medium", "low", "none"]


class StreamOptions(Body):
    include_usage: bool | None = None


class _Sampling(Body):
    """What chat and text completions share: model, streaming and sampling parameters."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class TextPart(Body, tag="text", tag_field="type"):
    text: str


class ImageURL(Body):
    url: str
    detail: str | None = None


class ImagePart(Body, tag="image_url", tag_field="type"):
    image_url: Annotated[
        str | ImageURL, msgspec.Meta(description="a base64 data URI (data:image/png;base64,...)")
    ]


class FunctionCall(Body):
    name: str
    arguments: Annotated[
        str | dict[str, Any] | None, msgspec.Meta(description="a JSON object, or its text")
    ] = None


class ToolCall(Body):
    function: FunctionCall
    id: str | None = None
    type: str | None = None


class ChatMessage(Body):
    role: str
    content: str | list[TextPart | ImagePart] | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class FunctionDefinition(Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(Body):
    function: FunctionDefinition
    type: str = "function"


class TextFormat(Body, tag="text", tag_field="type"):
    pass


class JsonObjectFormat(Body, tag="json_object", tag_field="type"):
    pass


class JsonSchema(Body):
    schema: dict[str, Any]
    name: str | None = None
    strict: bool | None = None


class JsonSchemaFormat(Body, tag="json_schema", tag_field="type"):
    json_schema: JsonSchema


class Reasoning(Body):
    effort: Effort | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    tools: list[ToolDefinition] | None = None
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = None
    reasoning_effort: Effort | None = None
    reasoning: Reasoning | None = None


class CompletionRequest(_Sampling, kw_only=True):
    """``POST /v1/completions``."""

    prompt: str
    suffix: str | None = None


class EmbeddingRequest(Body):
    """``POST /v1/embeddings``: text only, not token arrays (as Ollama)."""

    model: str
    input: str | Annotated[list[str], msgspec.Meta(min_length=1)]
    encoding_format: Annotated[str, msgspec.Meta(description='"float" or "base64"')] | None = None
    dimensions: int | None = None
