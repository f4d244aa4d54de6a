"""Garbage answers: what a broken proxy or runner sends instead of Ollama's NDJSON.

Four kinds (``GARBAGE_KINDS``): ``json``, a line that is not JSON in the middle of the
stream (then the body ends); ``html``, a reverse proxy's HTML error page with a 502,
answered before any generation starts; ``truncate``, a well-formed body that ends
before the ``done`` line; ``cut``, the TCP connection closed before it. None of them
counts as a completed generation; each counts under ``garbage`` in the stats and in
the request's run record.
"""

from __future__ import annotations

from typing import Any, NoReturn

import orjson

from corral.tooling.fake_ollama_state import FakeOllama
from corral.tooling.fake_ollama_wire import JSON_TYPE, Exchange, GarbageSentError

HTML_TYPE = b"text/html"
BAD_GATEWAY_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
NOT_JSON_LINE = b"garbage: this line is not JSON\n"


async def answer_bad_gateway(fake: FakeOllama, ex: Exchange, model: str, prompt: str) -> NoReturn:
    """The proxy in front of the node answers for it: no generation starts."""
    _count(fake, ex, fake.counters.run_entry(model, prompt))
    await ex.send_bytes(502, HTML_TYPE, BAD_GATEWAY_PAGE)
    raise GarbageSentError("html")


async def spoil(
    fake: FakeOllama, ex: Exchange, run: str, kind: str, final: dict[str, Any] | None
) -> NoReturn:
    """Spoil a generation under way; ``final`` is the closing object of a non-streamed answer
    (None while streaming)."""
    _count(fake, ex, run)
    if kind == "cut" and ex.abort():
        raise GarbageSentError(kind)
    # "cut" without a transport to kill (an in-process ASGI client) ends the body instead.
    if final is None:
        if kind == "json":
            await ex.send_raw_line(NOT_JSON_LINE)
        await ex.end_stream()
    else:
        whole = orjson.dumps(final)
        body = NOT_JSON_LINE if kind == "json" else whole[: len(whole) // 2]
        await ex.send_bytes(200, JSON_TYPE, body)
    raise GarbageSentError(kind)


def _count(fake: FakeOllama, ex: Exchange, run: str) -> None:
    # Counted before the client can see it, like every other outcome.
    fake.counters.add("garbage", ex.model)
    fake.counters.run_ended(run, "garbage")
