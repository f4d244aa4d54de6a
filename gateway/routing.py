"""The gateway's front door: fixed paths go straight to their endpoint.

Starlette sends every request through two middlewares, a router that tries each route's
regular expression in turn, and two exception wrappers. For the job paths that cost a
fifth of the gateway's CPU per request, and each layer's suspended coroutine stays in
memory for as long as the request waits for a node. Here a request for a fixed path
(all but ``/jobs/{id}`` and ``/api/blobs/{digest}``) is found by one dictionary lookup
on (method, path) and its endpoint is called directly, with the app's exception
handlers applied the way Starlette applies them. Everything else (a wrong method's 405,
a path with parameters, a request under a ``root_path``, the lifespan) goes through the
Starlette app unchanged.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


class FrontDoor:
    def __init__(
        self,
        app: Starlette,
        routes: Sequence[BaseRoute],
        handlers: Mapping[type[Exception], ErrorHandler],
    ) -> None:
        self.app = app
        self.handlers = dict(handlers)
        self.fixed: dict[tuple[str, str], Endpoint] = {}
        for route in routes:
            if isinstance(route, Route) and not route.param_convertors and route.methods:
                for method in route.methods:
                    self.fixed.setdefault((method, route.path), route.endpoint)

        self.failure = ""
        """Why the gateway must stop, once a background loop of it has died."""
        self.on_failure: Callable[[], None] | None = None
        """Stops the server hosting this app (set by whoever runs it)."""
        self.entry: ASGIApp = self.dispatch
        """What a request meets first: the dispatch below, or CORS around it."""

    @property
    def state(self) -> State:
        return self.app.state

    def fail(self, reason: str) -> None:
        """Stop serving because the gateway can no longer work; the process exits non-zero."""
        self.failure = reason
        if self.on_failure is not None:
            self.on_failure()
        else:  # a uvicorn worker process we did not start: its supervisor restarts it
            os.kill(os.getpid(), signal.SIGTERM)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.entry(scope, receive, send)

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            endpoint = self.fixed.get((scope["method"], scope["path"]))
            if endpoint is not None:
                scope["app"] = self.app
                request = Request(scope, receive, send)
                try:
                    response = await endpoint(request)
                except Exception as exc:
                    handler = self._handler_for(exc)
                    if handler is None:
                        raise  # uvicorn answers 500 and logs it, as Starlette's would
                    response = await handler(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _handler_for(self, exc: Exception) -> ErrorHandler | None:
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None
