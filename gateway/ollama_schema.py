"""The Ollama request bodies Corral accepts (and ``POST /jobs``, which carries one),
declared once: what is checked and what is published.

Each endpoint's body is a ``msgspec.Struct``; ``corral.gateway.validation`` checks a
parsed body against it and ``corral.gateway.openapi`` publishes its JSON Schema. The
gateway validates and never reshapes: the body goes to the node as the client sent it
(bar the model's full name and ``stream``), so a field not declared here passes through
untouched, as Ollama itself ignores fields it does not know. The types are Ollama's
(``api/types.go``): a request Ollama would refuse is refused here, with a 400, before it
is queued.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from corral.keys import JobKind

IntOption = Annotated[int | float, msgspec.Meta(description="an integer; Ollama drops a fraction")]
"""An integer option. Ollama reads options as JSON numbers and truncates, so 4096.0 works."""

KeepAlive = Annotated[
    str | int | float,
    msgspec.Meta(description='how long the model stays loaded: a duration ("5m") or seconds'),
]
Format = Annotated[
    str | dict[str, Any], msgspec.Meta(description='"json", or a JSON schema of the answer')
]
Think = Annotated[bool | str, msgspec.Meta(description='true/false, or a level ("high")')]


class Body(msgspec.Struct, kw_only=True, gc=False):
    """A request body: its undeclared fields are allowed and ignored, as Ollama does."""


class Options(Body):
    """Ollama's documented runner and generation options; any other name passes through
    (Ollama ignores names it does not know), but a known one must have its type."""

    # Runner options: changing them makes Ollama reload the model.
    num_ctx: IntOption | None = None
    num_batch: IntOption | None = None
    num_gpu: IntOption | None = None
    main_gpu: IntOption | None = None
    use_mmap: bool | None = None
    num_thread: IntOption | None = None
    numa: bool | None = None
    # Generation options.
    num_keep: IntOption | None = None
    seed: IntOption | None = None
    num_predict: IntOption | None = None
    top_k: IntOption | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_last_n: IntOption | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalize_newline: bool | None = None
    stop: list[str] | None = None


class _Model(Body):
    model: str
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class GenerateRequest(_Model):
    """``POST /api/generate``."""

    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    raw: bool | None = None
    stream: bool | None = None
    format: Format | None = None
    think: Think | None = None


class ToolCallFunction(Body):
    name: str
    arguments: dict[str, Any] | None = None
    index: int | None = None


class ToolCall(Body):
    function: ToolCallFunction
    id: str | None = None


class Message(Body):
    role: str
    content: str | None = None
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ChatRequest(_Model):
    """``POST /api/chat``; no messages loads the model and answers an empty chat."""

    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    stream: bool | None = None
    format: Format | None = None
    think: Think | None = None


class EmbedRequest(_Model):
    """``POST /api/embed``."""

    input: str | list[str] | None = None
    truncate: bool | None = None
    dimensions: int | None = None


class EmbeddingsRequest(_Model):
    """``POST /api/embeddings`` (Ollama's older embedding endpoint)."""

    prompt: str | None = None


class ShowRequest(Body):
    """``POST /api/show``: the model by ``model`` or by its older name, ``name``."""

    model: str | None = None
    name: str | None = None
    verbose: bool | None = None


BY_KIND: dict[JobKind, type[_Model]] = {
    JobKind.GENERATE: GenerateRequest,
    JobKind.CHAT: ChatRequest,
    JobKind.EMBED: EmbedRequest,
    JobKind.EMBEDDINGS: EmbeddingsRequest,
}
"""The body of each kind of job, on its Ollama path and inside ``POST /jobs``."""


class JobSubmission(Body):
    """``POST /jobs``: an Ollama body of ``kind``, with how to queue it and wait for it."""

    kind: JobKind
    request: Annotated[
        dict[str, Any], msgspec.Meta(description="the Ollama body of that kind, checked as such")
    ]
    wait: bool = True
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] | None = None
    timeout: Annotated[float, msgspec.Meta(gt=0, description="seconds to wait")] | None = None
    run_timeout: (
        Annotated[float, msgspec.Meta(gt=0, description="seconds one attempt may run")] | None
    ) = None
