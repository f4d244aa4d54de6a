"""Starlette's router with a lookup table in front for the fixed paths.

Starlette tries each route's regular expression in turn; with every Ollama, OpenAI and
job path registered, that scan was a tenth of the gateway's CPU per request. Fixed paths
(all but ``/jobs/{id}`` and ``/api/blobs/{digest}``) are found by one dictionary lookup on
(method, path); anything else, including a wrong method (405) and any request under a
``root_path`` (a mounted app), takes Starlette's own path.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute, Route, Router
from starlette.types import Receive, Scope, Send


class IndexedRouter(Router):
    def __init__(self, routes: Sequence[BaseRoute], **options: object) -> None:
        super().__init__(list(routes), **options)  # type: ignore[arg-type]
        self.fixed: dict[tuple[str, str], Route] = {}
        for route in routes:
            if isinstance(route, Route) and not route.param_convertors and route.methods:
                for method in route.methods:
                    self.fixed.setdefault((method, route.path), route)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            route = self.fixed.get((scope["method"], scope["path"]))
            if route is not None:
                scope.setdefault("router", self)
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = {}
                await route.handle(scope, receive, send)
                return
        await super().app(scope, receive, send)
