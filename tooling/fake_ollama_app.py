"""The Starlette app: Ollama's routes, the test-control routes, and the model request runner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from corral.tooling import fake_ollama_requests as req
from corral.tooling.fake_ollama_config import FakeOllamaConfig
from corral.tooling.fake_ollama_generation import (
    handle_chat,
    handle_embed,
    handle_embeddings,
    handle_generate,
)
from corral.tooling.fake_ollama_models import OLLAMA_VERSION
from corral.tooling.fake_ollama_state import FakeOllama
from corral.tooling.fake_ollama_wire import (
    JSON_TYPE,
    NDJSON_TYPE,
    ApiError,
    ClientGoneError,
    Exchange,
    GarbageSentError,
    NodeCrashedError,
)

Handler = Callable[[FakeOllama, Exchange, dict[str, Any]], Coroutine[Any, Any, None]]
# How long to wait for the server to notice a connection we killed ourselves.
_ABORT_SETTLE_S = 1.0


class ModelEndpoint:
    """Runs one model request while watching for the client to go away.

    The work and a `receive()` watcher race; a disconnect cancels the work at once, which
    frees its queue place or slot through the scheduler's cleanup.
    """

    def __init__(self, fake: FakeOllama, endpoint: str, handler: Handler) -> None:
        self._fake = fake
        self._endpoint = endpoint
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = Exchange(scope, receive, send)
        fake = self._fake
        fake.track(ex)
        try:
            await self._serve(ex)
        finally:
            fake.untrack(ex)

    async def _serve(self, ex: Exchange) -> None:
        fake = self._fake
        if fake.closing and ex.abort():
            await _settle(ex)
            return
        try:
            body = req.parse_body(await ex.read_body())
        except ClientGoneError:
            fake.counters.add("disconnects", None)
            return
        except ApiError as exc:
            fake.counters.count_request(self._endpoint, None)
            fake.counters.add("failed", None)  # before the client can see the answer
            await ex.send_error(exc.status, exc.message)
            return
        meta = fake.find_model(body.get("model"))
        model = ex.model = meta.name if meta is not None else None
        fake.counters.count_request(self._endpoint, model)
        ex.on_complete = lambda: fake.counters.add("completed", model)
        outcome = await self._race(ex, body)
        if outcome is not None:
            fake.counters.add(outcome, model)

    async def _race(self, ex: Exchange, body: dict[str, Any]) -> str | None:
        """Run the handler against a disconnect watcher; returns a counter still to bump."""
        work = asyncio.create_task(self._handler(self._fake, ex, body))
        watch = asyncio.create_task(ex.wait_disconnect())
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and not ex.complete:
                work.cancel()  # the client went away, or we aborted the connection
            await asyncio.wait((work,))
            if ex.aborted:
                await asyncio.wait((watch,), timeout=_ABORT_SETTLE_S)
        finally:
            # Also reached when this request task itself is cancelled: never leak children.
            for task in (work, watch):
                task.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)
        return await self._outcome(ex, work)

    async def _outcome(self, ex: Exchange, work: asyncio.Task[None]) -> str | None:
        if work.cancelled():
            return "failed" if ex.aborted else "disconnects"
        error = work.exception()
        if error is None or isinstance(error, NodeCrashedError | GarbageSentError):
            return None  # counted as the answer ended (on_complete), crashed or was spoiled
        if isinstance(error, ApiError) and not ex.started:
            self._fake.counters.add("failed", ex.model)  # before the client can see it
            await ex.send_error(error.status, error.message)
            return None
        raise error


async def _settle(ex: Exchange) -> None:
    """After killing a connection, let the server see it before the app returns."""
    try:
        async with asyncio.timeout(_ABORT_SETTLE_S):
            await ex.wait_disconnect()
    except TimeoutError:
        pass


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON_TYPE.decode())


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _ndjson(lines: list[dict[str, Any]]) -> Response:
    body = b"".join(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE) for line in lines)
    return Response(body, media_type=NDJSON_TYPE.decode())


class _Routes:
    """Handlers for the cheap endpoints, which need no scheduling."""

    def __init__(self, fake: FakeOllama) -> None:
        self.fake = fake

    async def _body(self, request: Request, endpoint: str) -> dict[str, Any]:
        self.fake.counters.count_request(endpoint, None)
        return req.parse_body(await request.body())

    async def root(self, request: Request) -> Response:
        self.fake.counters.count_request("/", None)
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        self.fake.counters.count_request("/api/version", None)
        return _json({"version": OLLAMA_VERSION})

    async def tags(self, request: Request) -> Response:
        self.fake.counters.count_request("/api/tags", None)
        return _json({"models": [meta.tag_entry() for meta in self.fake.catalogue()]})

    async def ps(self, request: Request) -> Response:
        fake = self.fake
        fake.counters.count_request("/api/ps", None)
        delay = fake.config.ps_delay
        if delay > 0:
            fake.counters.add("slow_ps", None)
            await fake.hold(delay)
        models = []
        for inst in fake.scheduler.ready_instances():
            meta = fake.find_model(inst.model)
            if meta is not None:
                expires = fake.expires_at_ns(fake.scheduler.expires_at(inst))
                models.append(meta.ps_entry(inst.num_ctx, expires))
        return _json({"models": models})

    async def show(self, request: Request) -> Response:
        body = await self._body(request, "/api/show")
        name = req.model_field(body, "name")
        meta = self.fake.find_model(name)
        if meta is None:
            return _error(404, f"model '{name}' not found")
        return _json(meta.show(self.fake.config.embedding_dim))

    async def pull(self, request: Request) -> Response:
        body = await self._body(request, "/api/pull")
        meta = self.fake.add_model(req.model_field(body, "name"))
        steps = ["pulling manifest", f"pulling {meta.digest[:12]}", "verifying sha256 digest"]
        return self._progress(body, [*steps, "writing manifest", "success"])

    async def push(self, request: Request) -> Response:
        body = await self._body(request, "/api/push")
        name = req.model_field(body, "name")
        if self.fake.find_model(name) is None:
            return _error(404, f"model '{name}' not found")
        return self._progress(body, ["retrieving manifest", "pushing manifest", "success"])

    async def create(self, request: Request) -> Response:
        body = await self._body(request, "/api/create")
        self.fake.add_model(req.model_field(body, "name"))
        return self._progress(body, ["using existing layer", "writing manifest", "success"])

    async def delete(self, request: Request) -> Response:
        body = await self._body(request, "/api/delete")
        name = req.model_field(body, "name")
        meta = self.fake.find_model(name)
        if meta is None:
            return _error(404, f"model '{name}' not found")
        self.fake.remove_model(meta.name)
        return Response(status_code=200)

    async def copy(self, request: Request) -> Response:
        body = await self._body(request, "/api/copy")
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str) or not destination:
            return _error(400, "source and destination are required")
        if self.fake.find_model(source) is None:
            return _error(404, f'model "{source}" not found')
        self.fake.add_model(destination)
        return Response(status_code=200)

    def _progress(self, body: dict[str, Any], steps: list[str]) -> Response:
        if req.stream_flag(body):
            return _ndjson([{"status": step} for step in steps])
        return _json({"status": steps[-1]})

    # -- test control ---------------------------------------------------------------------

    async def fake_stats(self, request: Request) -> Response:
        return _json(self.fake.stats())

    async def fake_runs(self, request: Request) -> Response:
        """Per request fingerprint: generations started, completed and spoiled, with times."""
        return _json({"runs": self.fake.counters.runs_snapshot()})

    async def fake_config(self, request: Request) -> Response:
        if request.method == "POST":
            changes = req.parse_body(await request.body())
            try:
                self.fake.configure(**changes)
            except ValueError as exc:
                return _error(400, str(exc))
        return _json(self.fake.config.as_dict())

    async def fake_reset(self, request: Request) -> Response:
        self.fake.reset()
        return _json({"status": "ok", "at": time.time()})


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Any]:
    """Turn ApiError into Ollama's `{"error": ...}` answer."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.message)

    return endpoint


async def _not_found(request: Request, exc: Exception) -> Response:
    # Ollama's HTTP router answers unknown paths and wrong methods with a plain 404.
    return PlainTextResponse("404 page not found", status_code=404)


def _routes(fake: FakeOllama) -> list[BaseRoute]:
    r = _Routes(fake)
    plain: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = [
        ("/", r.root, ["GET", "HEAD"]),
        ("/api/version", r.version, ["GET"]),
        ("/api/tags", r.tags, ["GET"]),
        ("/api/ps", r.ps, ["GET"]),
        ("/api/show", r.show, ["POST"]),
        ("/api/pull", r.pull, ["POST"]),
        ("/api/push", r.push, ["POST"]),
        ("/api/create", r.create, ["POST"]),
        ("/api/delete", r.delete, ["DELETE"]),
        ("/api/copy", r.copy, ["POST"]),
        ("/_fake/stats", r.fake_stats, ["GET"]),
        ("/_fake/runs", r.fake_runs, ["GET"]),
        ("/_fake/config", r.fake_config, ["GET", "POST"]),
        ("/_fake/reset", r.fake_reset, ["POST"]),
    ]
    model: list[tuple[str, Handler]] = [
        ("/api/generate", handle_generate),
        ("/api/chat", handle_chat),
        ("/api/embed", handle_embed),
        ("/api/embeddings", handle_embeddings),
    ]
    routes: list[BaseRoute] = [
        Route(path, _guarded(handler), methods=methods) for path, handler, methods in plain
    ]
    routes += [
        Route(path, ModelEndpoint(fake, path, handler), methods=["POST"]) for path, handler in model
    ]
    return routes


def create_app(config: FakeOllamaConfig | None = None) -> Starlette:
    """An ASGI app that behaves like one Ollama node; `app.state.fake` is its FakeOllama."""
    fake = FakeOllama(config)
    app = Starlette(
        routes=_routes(fake),
        exception_handlers={404: _not_found, 405: _not_found},
    )
    app.state.fake = fake
    return app
