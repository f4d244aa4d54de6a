"""The audit log: one JSON line per routing decision, refusal and admin request.

A line names the key by its id (never the key), its class, the route, and, for a request
that became a job, the job id, the model, the priority asked for and the one granted, and
how it was answered: its status, and the ``X-Corral-Degraded`` and ``X-Corral-Cache``
values it carried. The line is written when the response starts (its status and headers
are known then), so the node that ran the job is not in it: ``GET /jobs/{id}`` has that.

Off unless ``CORRAL_AUDIT_LOG`` names a file (or ``-``, standard error), so the requests
of a gateway without it pay nothing.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from corral.audit import AuditLog
from corral.jobs import JobSpec

__all__ = ["AuditLog", "Tapped", "fields_of", "note_job"]


def note_job(request: Request, spec: JobSpec) -> None:
    """Remember the job a request became, for its audit line."""
    request.state.job = spec


def fields_of(request: Request, status: int) -> dict[str, Any]:
    from corral.gateway.auth import principal_of

    principal = principal_of(request)
    line: dict[str, Any] = {
        "key": principal.key.id,
        "class": principal.key.key_class,
        "method": request.method,
        "path": request.url.path,
        "status": status,
        "outcome": "ok" if status < 400 else "refused",
    }
    spec: JobSpec | None = getattr(request.state, "job", None)
    if spec is not None:
        line["job"] = spec.job_id
        line["model"] = spec.model
        line["priority_asked"] = (
            spec.priority if spec.priority_asked is None else spec.priority_asked
        )
        line["priority"] = spec.priority
    return line


class Tapped(Response):
    """A response passed through as it is, with headers added to its start and an audit
    line written from its status and headers."""

    def __init__(
        self,
        inner: Response,
        request: Request,
        audit: AuditLog | None,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.inner = inner
        self.request = request
        self.audit = audit
        self.extra = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                if self.extra:
                    message["headers"] = [*message.get("headers", []), *self.extra]
                if self.audit is not None:
                    self._write(message)
            await send(message)

        await self.inner(scope, receive, tapped)

    def _write(self, start: Message) -> None:
        assert self.audit is not None
        line = fields_of(self.request, int(start["status"]))
        for name, value in start.get("headers", []):
            if name == b"x-corral-degraded":
                line["degraded"] = value.decode()
            elif name == b"x-corral-cache":
                line["cache"] = value.decode()
            elif name == b"x-corral-job-id" and "job" not in line:
                line["job"] = value.decode()
        self.audit.write(line)
