"""How one API dialect writes a job's replies.

The job path is the same for every dialect (one queue, one worker protocol); a dialect
only turns worker replies into its wire format: Ollama's NDJSON and ``{"error": ...}``,
or OpenAI's server-sent events and ``{"error": {"message": ...}}``.
"""

from __future__ import annotations

from typing import Protocol

import orjson


class Dialect(Protocol):
    stream_media_type: str
    name: str
    """The ``dialect`` label of the latency metrics: ``ollama``, ``openai`` or ``jobs``."""

    def chunk(self, payload: bytes) -> bytes:
        """Bytes to write for one streamed chunk (``b""`` writes nothing)."""

    def last(self, payload: bytes) -> bytes:
        """Bytes that end a stream, given the final message."""

    def stream_error(self, message: str, status: int) -> bytes:
        """Bytes that end a stream that failed after output started."""

    def single(self, payload: bytes) -> bytes:
        """The body of a non-streaming answer, given the final message."""

    def error_body(self, message: str, status: int) -> bytes:
        """The body of an error answered before any output."""


class OllamaDialect:
    """Ollama's own format: chunks and results are forwarded untouched."""

    stream_media_type = "application/x-ndjson"
    name = "ollama"

    def chunk(self, payload: bytes) -> bytes:
        return payload + b"\n"

    def last(self, payload: bytes) -> bytes:
        return payload + b"\n"

    def stream_error(self, message: str, status: int) -> bytes:
        return orjson.dumps({"error": message}) + b"\n"

    def single(self, payload: bytes) -> bytes:
        return payload

    def error_body(self, message: str, status: int) -> bytes:
        return orjson.dumps({"error": message})


OLLAMA = OllamaDialect()


_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(message: str, status: int) -> bytes:
    """OpenAI's error object, typed by status as Ollama's compatibility layer does."""
    kind = _OPENAI_ERROR_TYPES.get(status, "api_error")  # fmt: skip
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})
