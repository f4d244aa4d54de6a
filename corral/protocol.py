"""Reply messages from workers to the gateway that owns a job.

A message is ``b"<job id> <seq> <type> <payload>"`` on the gateway's reply channel:

* ``C`` a chunk: one Ollama NDJSON object (no newline), forwarded untouched;
* ``D`` done: the final object (the last chunk, or the whole answer for a
  non-streaming request), after which the job has no more output;
* ``E`` error: ``{"error": message, "status": http status}``; also final.

``seq`` counts the job's messages from 0 so the gateway can drop duplicates and see
gaps; a final message whose sender cannot know that count carries ``UNSEQUENCED``. The
header is plain ASCII so the payload is never parsed on the hot path.

Every message is built here: the Lua scripts never write this format. A script that
ends a job only it finds (a claim ending an expired or orphaned queued job) is given
``tail(...)`` and publishes ``<job id>`` followed by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import orjson

CHUNK: Final = b"C"
DONE: Final = b"D"
ERROR: Final = b"E"

UNSEQUENCED: Final = 999_999_999
"""The ``seq`` of a final message whose sender does not know how many chunks came before
it: a script ending a queued job, a cancel, a hand-back or dead letter of a job that
already streamed, a reply rebuilt from the job record. The gateway ends the answer with
it whenever it arrives, instead of waiting for its turn. Far above any real count, and
the value earlier releases already sent for dead letters and hand-backs, so gateways and
workers of two versions agree on it during a rolling upgrade."""


@dataclass(slots=True, frozen=True)
class Reply:
    job_id: str
    seq: int
    type: bytes
    payload: bytes

    @property
    def final(self) -> bool:
        return self.type != CHUNK


def encode(job_id: str, seq: int, type_: bytes, payload: bytes) -> bytes:
    return b"%s %d %s %s" % (job_id.encode(), seq, type_, payload)


def encode_error(job_id: str, seq: int, message: str, status: int) -> bytes:
    return encode(job_id, seq, ERROR, error_payload(message, status))


def unsequenced_error(job_id: str, message: str, status: int) -> bytes:
    """A final error from a sender that does not know how many chunks came before it."""
    return encode_error(job_id, UNSEQUENCED, message, status)


def tail(type_: bytes, payload: bytes, seq: int = UNSEQUENCED) -> bytes:
    """A message without its job id: ``encode(job_id, ...) == job_id.encode() + tail(...)``.

    For a script that ends jobs only it knows of: it prefixes each one's id."""
    return b" %d %s %s" % (seq, type_, payload)


def error_payload(message: str, status: int) -> bytes:
    return orjson.dumps({"error": message, "status": status})


def decode(data: bytes) -> Reply:
    job_id, seq, type_, payload = data.split(b" ", 3)
    return Reply(job_id.decode(), int(seq), type_, payload)


def parse_error(payload: bytes) -> tuple[str, int]:
    """The message and HTTP status of an ``E`` payload."""
    obj = orjson.loads(payload)
    return str(obj.get("error", "unknown error")), int(obj.get("status", 500))
