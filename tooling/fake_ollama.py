"""A fake Ollama server that behaves like a real node on the wire.

The official `ollama` client works against it unchanged. Replies are deterministic
("echo: <prompt>"), scheduling follows Ollama's (parallel slots, FIFO queue, model loads
and LRU eviction), failures can be injected (errors, crashes, hangs, garbage answers, a
slow ``/api/ps``), and counters record what happened, per request too (``/_fake/runs``):

    server = await start_fake_ollama(FakeOllamaConfig(num_parallel=2))
    client = ollama.AsyncClient(host=server.url)
    ...
    assert server.fake.stats()["max_active"] <= 2
    await server.stop()

Run one from the command line with `corral fake-ollama --port 11434`.

One departure from a real model, kept because benchmarks rely on it: ``num_predict``
is the answer's exact length (the echo's words are cycled to fill it), where a model
would stop at its end of sequence first. A request without ``num_predict`` ends at the
echo's natural end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Generator, Sequence
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from corral.tooling.fake_ollama_app import create_app
from corral.tooling.fake_ollama_config import FakeOllamaConfig, validate_changes
from corral.tooling.fake_ollama_state import FakeOllama

__all__ = [
    "FakeOllama",
    "FakeOllamaConfig",
    "FakeOllamaServer",
    "create_app",
    "main",
    "start_fake_ollama",
]

# Seconds to let requests finish at shutdown; model requests are aborted before that.
_GRACEFUL_SHUTDOWN_S = 5.0
_DATE_REFRESH_S = 1.0


class _EmbeddedConfig(uvicorn.Config):
    def configure_logging(self) -> None:
        # An embedded server must not reconfigure the host process's logging.
        return


class _EmbeddedServer(uvicorn.Server):
    """uvicorn.Server that shares its host's event loop and signal handling."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()
        self._wake = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Several fakes may run in one process; signals belong to the host program.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        # Same duty as uvicorn's loop (refresh the Date header, notice should_exit),
        # but woken by request_exit() instead of a 100 ms poll, so stop() is prompt.
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864_000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DATE_REFRESH_S):
                    await self._wake.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own shutdown sleeps and polls in 100 ms steps, which adds up over a test
        # suite that starts many fakes. The fake has already aborted its model requests, so
        # waiting on the remaining request tasks directly is enough.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        tasks = set(self.server_state.tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=_GRACEFUL_SHUTDOWN_S)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for server in self.servers:
            await server.wait_closed()
        await self.lifespan.shutdown()
        # One loop turn lets closed transports run connection_lost and release sockets.
        await asyncio.sleep(0)

    def request_exit(self) -> None:
        self.should_exit = True
        self._wake.set()


class FakeOllamaServer:
    """A fake Ollama node listening on a real socket in the current event loop."""

    def __init__(
        self,
        app: Starlette,
        server: _EmbeddedServer,
        task: asyncio.Task[None],
        host: str,
        port: int,
    ) -> None:
        self.app = app
        self.fake: FakeOllama = app.state.fake
        self.host = host
        self.port = port
        self._server = server
        self._task = task

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    async def stop(self) -> None:
        """Abort open model requests (as a dying node would) and shut down. Idempotent."""
        self.fake.abort_inflight()
        self._server.request_exit()
        await asyncio.shield(self._task)

    async def __aenter__(self) -> FakeOllamaServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def start_fake_ollama(
    config: FakeOllamaConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> FakeOllamaServer:
    """Serve a fake node in this event loop; returns once it accepts connections."""
    app = create_app(config)
    sock = _bind(host, port)
    real_port = int(sock.getsockname()[1])
    server = _EmbeddedServer(
        _EmbeddedConfig(
            app,
            host=host,
            port=real_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="none",
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"fake-ollama:{real_port}")
    try:
        await _until_started(server, task)
    except BaseException:
        sock.close()
        raise
    return FakeOllamaServer(app, server, task, host, real_port)


async def _until_started(server: _EmbeddedServer, task: asyncio.Task[None]) -> None:
    ready = asyncio.create_task(server.ready.wait())
    try:
        await asyncio.wait((ready, task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ready
    if not server.ready.is_set():
        error = task.exception() if task.done() and not task.cancelled() else None
        raise RuntimeError("fake Ollama server exited during startup") from error


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    host = wildcard.get(host, host)
    return f"[{host}]" if ":" in host else host


# -- command line -----------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    """Read an Ollama setting; like Ollama, 0 or unset means "use the default"."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    return value if value > 0 else default


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _parser() -> argparse.ArgumentParser:
    defaults = FakeOllamaConfig()
    p = argparse.ArgumentParser(
        prog="corral fake-ollama", description="Serve a fake Ollama node for tests and demos."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    p.add_argument("--models", type=_names, default=defaults.models, help="comma-separated")
    p.add_argument("--preload", type=_names, default=[], help="models loaded at start")
    p.add_argument(
        "--num-parallel", type=int, default=_env_int("OLLAMA_NUM_PARALLEL", defaults.num_parallel)
    )
    p.add_argument(
        "--max-loaded-models",
        type=int,
        default=_env_int("OLLAMA_MAX_LOADED_MODELS", defaults.max_loaded_models),
    )
    p.add_argument(
        "--max-queue", type=int, default=_env_int("OLLAMA_MAX_QUEUE", defaults.max_queue)
    )
    p.add_argument("--load-delay", type=float, default=defaults.load_delay, help="seconds")
    p.add_argument("--token-rate", type=float, default=defaults.token_rate, help="0 = unlimited")
    p.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    p.add_argument("--fail-rate", type=float, default=defaults.fail_rate)
    p.add_argument("--fail-status", type=int, default=defaults.fail_status)
    p.add_argument("--crash-after-tokens", type=int, default=None)
    p.add_argument("--hang", action="store_true")
    p.add_argument(
        "--garbage-marker",
        default=defaults.garbage_marker,
        help="answer garbage to prompts that contain this text",
    )
    p.add_argument(
        "--garbage-rate",
        type=float,
        default=defaults.garbage_rate,
        help="share of generations answered with garbage",
    )
    p.add_argument(
        "--garbage-kind",
        default=defaults.garbage_kind,
        help="json, html, truncate, cut, or mixed (each in turn)",
    )
    p.add_argument(
        "--garbage-after-tokens",
        type=int,
        default=defaults.garbage_after_tokens,
        help="tokens streamed before the garbage",
    )
    p.add_argument(
        "--ps-delay", type=float, default=defaults.ps_delay, help="seconds /api/ps waits"
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--context-length", type=int, default=defaults.context_length)
    return p


def _config_from_args(args: argparse.Namespace) -> FakeOllamaConfig:
    # The same validation as runtime changes through /_fake/config.
    valid = validate_changes(
        {
            "models": args.models,
            "preloaded": args.preload,
            "num_parallel": args.num_parallel,
            "max_loaded_models": args.max_loaded_models,
            "max_queue": args.max_queue,
            "load_delay": args.load_delay,
            "token_rate": args.token_rate,
            "embedding_dim": args.embedding_dim,
            "fail_rate": args.fail_rate,
            "fail_status": args.fail_status,
            "crash_after_tokens": args.crash_after_tokens,
            "hang": args.hang,
            "garbage_marker": args.garbage_marker,
            "garbage_rate": args.garbage_rate,
            "garbage_kind": args.garbage_kind,
            "garbage_after_tokens": args.garbage_after_tokens,
            "ps_delay": args.ps_delay,
            "seed": args.seed,
            "context_length": args.context_length,
        }
    )
    config = FakeOllamaConfig(**valid)
    FakeOllama(config)  # raises ValueError for preloaded models it would not serve
    return config


async def _serve_until_signalled(config: FakeOllamaConfig, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = await start_fake_ollama(config, host, port)
        print(f"fake ollama listening on {server.url}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """`corral fake-ollama ...`: serve until SIGINT/SIGTERM, then exit 0."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"corral fake-ollama: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
        runner.run(_serve_until_signalled(config, args.host, args.port))
    return 0


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed, as uvicorn itself would pick; the fake must not be the bottleneck."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    raise SystemExit(main())
