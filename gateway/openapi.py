"""The gateway's request bodies as an OpenAPI 3.1 document, built from their models.

Only what the models declare is published: each route that takes a body, and the JSON
Schema of that body (``msgspec.json.schema_components``), so a client or a fuzzer reads
the same types the gateway checks. Answers are described in words: they are Ollama's or
OpenAI's own, and the README documents them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

REF = "#/components/schemas/{name}"

_RESPONSES = {
    "200": {"description": "the answer, as Ollama or OpenAI writes it (streamed or not)"},
    "400": {"description": "the body does not match its schema; nothing was queued"},
    "401": {"description": "a valid API key is required"},
    "404": {"description": "no live node serves the model"},
    "413": {"description": "the body is larger than the gateway accepts"},
    "503": {"description": "the queue is full (429 on /v1); retry after Retry-After"},
    "504": {"description": "no answer within the request's time limit"},
}


def document(
    bodies: Mapping[str, type[msgspec.Struct]], *, title: str, version: str
) -> dict[str, Any]:
    """An OpenAPI 3.1 document with a ``POST`` operation for each path of ``bodies``."""
    models = list(dict.fromkeys(bodies.values()))
    refs, schemas = msgspec.json.schema_components(models, ref_template=REF)
    ref_of = dict(zip(models, refs, strict=True))
    paths = {path: {"post": _operation(path, ref_of[model])} for path, model in bodies.items()}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _operation(path: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "operationId": path.strip("/").replace("/", "_").replace(".", "_"),
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": _RESPONSES,
    }
