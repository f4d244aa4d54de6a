"""Fold a stream of Ollama chunks into the one object Ollama answers with ``stream: false``.

The worker always streams from Ollama (so a cancel aborts at once and chunks can be
forwarded); for clients that asked for a single answer it rebuilds what Ollama would
have sent: the last chunk's statistics with the full text.
"""

from __future__ import annotations

from typing import Any

from corral.keys import JobKind


class Aggregator:
    def __init__(self, kind: JobKind) -> None:
        self.kind = kind
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[Any] = []
        self.final: dict[str, Any] | None = None
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        if self.kind is JobKind.CHAT:
            message = chunk.get("message") or {}
            self._take(message.get("content"), message.get("thinking"))
            self.tool_calls.extend(message.get("tool_calls") or ())
        else:
            self._take(chunk.get("response"), chunk.get("thinking"))
        if chunk.get("done"):
            self.final = chunk

    def _take(self, text: Any, thinking: Any) -> None:
        if text:
            self.text.append(str(text))
        if thinking:
            self.thinking.append(str(thinking))

    @property
    def done(self) -> bool:
        return self.final is not None

    def result(self) -> dict[str, Any]:
        """The non-streaming answer; only valid once ``done``."""
        out = dict(self.final or {})
        text = "".join(self.text)
        if self.kind is JobKind.CHAT:
            message: dict[str, Any] = dict(out.get("message") or {"role": "assistant"})
            message["content"] = text
            if self.thinking:
                message["thinking"] = "".join(self.thinking)
            if self.tool_calls:
                message["tool_calls"] = self.tool_calls
            out["message"] = message
        else:
            out["response"] = text
            if self.thinking:
                out["thinking"] = "".join(self.thinking)
        return out
