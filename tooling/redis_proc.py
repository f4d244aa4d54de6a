"""Start and stop a throwaway Redis for the tests, the demo and the benchmarks.

Two kinds, with the same small surface (``start()``, ``stop()``, ``url``, context
manager):

* :class:`RedisProcess` runs a real ``redis-server`` as a child process on a free
  loopback port (started, stopped and reaped by ``corral.children``). It is what the
  tests require and what the demo prefers.
* :class:`EmbeddedRedis` serves ``fakeredis`` over TCP from a background thread,
  for machines without ``redis-server``. It needs the optional ``embedded`` extra
  (``fakeredis[lua]``), which is imported only when one is started.

Nothing here runs at import time: no process, thread, socket or file exists until
``start()`` is called.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Protocol, Self
from urllib.parse import quote

import redis as redis_sync
from redis.backoff import NoBackoff
from redis.retry import Retry

from corral.children import Child, ChildExited

if TYPE_CHECKING:
    from fakeredis import TcpFakeServer

__all__ = [
    "EmbeddedRedis",
    "RedisProcess",
    "RedisServer",
    "RedisStartError",
    "find_redis_server",
    "free_port",
    "start_best_redis",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_DEFAULT_REDIS_PORT = 6379
_SEARCH_DIRS = ("/usr/sbin", "/usr/local/bin")
_INSTALL_HINT = (
    "install redis-server (Debian/Ubuntu: `apt-get install redis-server`, "
    "macOS: `brew install redis`, Fedora: `dnf install redis`)"
)
_EMBEDDED_HINT = "pip install 'corral[embedded]'  (fakeredis[lua])"


class RedisStartError(RuntimeError):
    """A Redis could not be started or did not answer PING in time."""


class RedisServer(Protocol):
    """What the demo and benchmarks need from either kind of Redis."""

    @property
    def url(self) -> str: ...

    def start(self) -> Self: ...

    def stop(self) -> None: ...


# --------------------------------------------------------------------------- helpers


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` executable: on ``PATH``, else in the usual sbin dirs."""
    found = shutil.which("redis-server")
    if found:
        return found
    for directory in _SEARCH_DIRS:
        candidate = Path(directory) / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (never 6379).

    The kernel picks it, so another process may take it before we bind it; callers
    that start a server on it should retry with a new port if the bind fails.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port != _DEFAULT_REDIS_PORT:
            return port


def _ping(host: str, port: int, timeout: float, auth: tuple[str, str] | None = None) -> bool:
    """True when Redis on ``host:port`` answers PING (not ``-LOADING``), as ``auth``'s user
    if given (a server whose default user is off refuses an unauthenticated PING)."""
    user, password = auth if auth is not None else (None, None)
    client = redis_sync.Redis(
        host=host,
        port=port,
        username=user,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),  # the caller polls; a retry would only hide an exit
    )
    try:
        return bool(client.ping())
    except redis_sync.RedisError:
        return False
    finally:
        client.close()


# Every running process is remembered until it is reaped, so that an interpreter
# exit with one still running (even one nobody holds any more) leaves no orphan.
_LIVE: set[RedisProcess] = set()
_ATEXIT_LOCK = threading.Lock()
_atexit_registered = False


def _stop_all_at_exit() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop()


def _register_atexit() -> None:
    global _atexit_registered  # noqa: PLW0603 - a one-shot registration flag
    with _ATEXIT_LOCK:
        if not _atexit_registered:
            atexit.register(_stop_all_at_exit)
            _atexit_registered = True


# --------------------------------------------------------------------- RedisProcess


class RedisProcess:
    """A real ``redis-server`` child process on ``127.0.0.1``.

    ``port=None`` picks a free port at the first ``start()`` and keeps it, so that
    ``restart()`` comes back on the same URL. ``dir=None`` uses a fresh temporary
    directory that ``stop()`` removes. Without ``appendonly`` nothing is written to
    disk at all (RDB snapshots are off, the log goes to an unnamed temp file); with
    it, the AOF (``appendfsync everysec``) lives in ``dir`` and survives
    ``restart()`` and ``kill()``. ``extra_args`` are appended to the command line
    and so override the defaults (e.g. ``["--appendfsync", "always"]``). ``auth`` (user,
    password) is for a server whose ACL turns the default user off (``extra_args`` of
    ``["--aclfile", path]``): the readiness PING authenticates with it and ``url``
    carries it.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        port: int | None = None,
        dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        executable: str | None = None,
        startup_timeout: float = 15.0,
        stop_timeout: float = 10.0,
        auth: tuple[str, str] | None = None,
    ) -> None:
        if port == _DEFAULT_REDIS_PORT:
            raise ValueError("refusing port 6379: it belongs to a Redis that is not ours")
        self.appendonly = appendonly
        self.auth = auth
        self.extra_args = tuple(extra_args)
        self.executable = executable
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._port = port
        self._port_fixed = port is not None
        self._dir: Path | None = Path(dir) if dir is not None else None
        self._owns_dir = dir is None
        self._child: Child | None = None
        self._log: IO[bytes] | None = None

    # -- properties

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisProcess has no port until start() is called")
        return self._port

    @property
    def url(self) -> str:
        if self.auth is None:
            return f"redis://{HOST}:{self.port}/0"
        user, password = (quote(part, safe="") for part in self.auth)
        return f"redis://{user}:{password}@{HOST}:{self.port}/0"

    @property
    def dir(self) -> Path | None:
        """Working directory (AOF lives here); ``None`` before the first start."""
        return self._dir

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.alive

    # -- lifecycle

    def start(self) -> Self:
        """Launch ``redis-server`` and return once it answers PING."""
        if self.running:
            return self
        self._reap()
        executable = self.executable or find_redis_server()
        if executable is None:
            raise RedisStartError(f"redis-server not found; {_INSTALL_HINT}")
        made_dir = False
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="corral-redis-"))
            self._owns_dir = made_dir = True
        else:
            self._dir.mkdir(parents=True, exist_ok=True)
        try:
            self._launch_on_a_free_port(executable)
        except BaseException:
            if made_dir:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            raise
        return self

    def _launch_on_a_free_port(self, executable: str) -> None:
        attempts = 1 if self._port_fixed else 3
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = free_port()
            try:
                self._launch(executable)
            except RedisStartError as exc:
                lost_race = "Address already in use" in str(exc)
                if attempt == attempts or not lost_race:
                    raise
                log.debug("port %s was taken, retrying on another", self._port)
                self._port = None
            else:
                self._port_fixed = True  # restart() must come back on the same URL
                return

    def _command(self, executable: str) -> list[str]:
        assert self._dir is not None
        assert self._port is not None
        cmd = [
            executable,
            "--port", str(self._port),
            "--bind", HOST,
            "--dir", str(self._dir),
            "--daemonize", "no",
            "--logfile", "",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            cmd += ["--appendfsync", "everysec"]
        cmd += list(self.extra_args)
        return cmd

    def _launch(self, executable: str) -> None:
        port = self.port
        # The log is an unlinked temp file: readable for error reports, gone on close.
        self._log = tempfile.TemporaryFile(prefix="corral-redis-log-")  # noqa: SIM115
        # Its own session (Child's default): a Ctrl-C meant for us must not kill Redis
        # under a demo that is still draining; we stop it ourselves.
        self._child = child = Child(
            "redis-server", self._command(executable), log=self._log, cwd=self._dir
        )
        _LIVE.add(self)
        _register_atexit()
        try:
            child.wait_until(
                lambda: _ping(HOST, port, timeout=0.5, auth=self.auth),
                self.startup_timeout,
                f"redis-server on port {port} answering PING",
            )
        except ChildExited:
            tail = self._log_tail()
            self._terminate(graceful=False)
            raise RedisStartError(
                f"redis-server exited with code {child.returncode} on port {port}:\n{tail}"
            ) from None
        except BaseException as exc:
            tail = self._log_tail()
            self._terminate(graceful=False)
            if isinstance(exc, TimeoutError):
                raise RedisStartError(f"{exc}; its log:\n{tail}") from None
            raise
        log.debug("redis-server pid %s ready at %s", child.pid, self.url)

    def _log_tail(self, limit: int = 4000) -> str:
        if self._log is None or self._log.closed:
            return ""
        try:
            self._log.flush()
            size = self._log.seek(0, os.SEEK_END)
            self._log.seek(max(0, size - limit))
            return self._log.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def _terminate(self, *, graceful: bool) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``stop_timeout``) or kill it."""
        if self._child is not None:
            if graceful:
                self._child.stop(self.stop_timeout)
            else:
                self._child.kill()
        self._reap()

    def _reap(self) -> None:
        self._child = None
        _LIVE.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF), wait, SIGKILL if it lingers; remove a temp dir."""
        self._terminate(graceful=True)
        if self._owns_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no AOF flush, the directory is kept for ``restart()``."""
        self._terminate(graceful=False)

    def restart(self) -> Self:
        """Stop (gracefully, if still running) and start again on the same port and dir."""
        self._terminate(graceful=True)
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisProcess {state} port={self._port} appendonly={self.appendonly}>"


# -------------------------------------------------------------------- EmbeddedRedis


class EmbeddedRedis:
    """``fakeredis`` served over TCP from a background thread, on ``127.0.0.1``.

    A stand-in for machines without ``redis-server``: in-memory only, one Python
    process, no persistence. Requires ``fakeredis[lua]`` (the ``embedded`` extra).
    """

    def __init__(self, *, port: int | None = None) -> None:
        if port == _DEFAULT_REDIS_PORT:
            raise ValueError("refusing port 6379: it belongs to a Redis that is not ours")
        self._requested_port = port
        self._port: int | None = None
        self._server: TcpFakeServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedRedis has no port until start() is called")
        return self._port

    @property
    def url(self) -> str:
        # RESP2: fakeredis answers ``redis.call`` inside Lua in the caller's protocol, and
        # under RESP3 an XREADGROUP comes back in a shape real Redis never gives scripts.
        return f"redis://{HOST}:{self.port}/0?protocol=2"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def preload_scripts(self) -> None:
        """Load Corral's Functions library before any process calls one.

        fakeredis's TCP server drops a connection right after any error reply, so the
        first call's "function not found" would cost a dropped connection; loaded
        functions never miss.
        """
        import redis as redis_sync

        from corral import scripts

        client = redis_sync.Redis.from_url(self.url)
        try:
            scripts.load_sync(client)
        finally:
            client.close()

    def start(self) -> Self:
        if self.running:
            return self
        server_cls = _import_tcp_fake_server()
        # Port 0 lets the kernel choose while we bind: no race with other processes.
        server = server_cls((HOST, self._requested_port or 0))
        # Daemon connection threads: a client still connected when the interpreter
        # exits must not keep it alive. stop() still ends them (shutdown() sets the
        # event their loops poll).
        server.daemon_threads = True
        self._server = server
        self._port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"corral-embedded-redis:{self._port}",
            daemon=True,
        )
        self._thread.start()
        # The socket listens from the constructor on, so this first round trip is served
        # as soon as the thread runs: it is the readiness check.
        try:
            self.preload_scripts()
        except BaseException:
            self.stop()
            raise
        log.debug("embedded Redis ready at %s", self.url)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        if thread is not None and thread.is_alive():
            server.shutdown()  # ends serve_forever and tells connection handlers to quit
        server.server_close()  # closes the listening socket
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedRedis {state} port={self._port}>"


def _import_tcp_fake_server() -> type[TcpFakeServer]:
    try:
        from fakeredis import TcpFakeServer
    except ImportError as exc:
        raise RedisStartError(
            f"the embedded Redis needs fakeredis with Lua support: {_EMBEDDED_HINT}"
        ) from exc
    # fakeredis runs Lua (FCALL) with lupa; without it every Corral function fails.
    if importlib.util.find_spec("lupa") is None:
        raise RedisStartError(f"the embedded Redis needs Lua scripting (lupa): {_EMBEDDED_HINT}")
    return TcpFakeServer


# ------------------------------------------------------------------ start_best_redis


def start_best_redis(
    prefer_real: bool = True,
    *,
    appendonly: bool = False,
    dir: str | os.PathLike[str] | None = None,
) -> RedisProcess | EmbeddedRedis:
    """Start a real ``redis-server`` if there is one (or, with ``prefer_real=False``,
    the embedded one first), falling back to the other kind; log which one runs.

    ``appendonly`` and ``dir`` apply only to a real ``redis-server``.
    """
    errors: list[str] = []

    def real() -> RedisProcess | None:
        exe = find_redis_server()
        if exe is None:
            errors.append(f"redis-server not found ({_INSTALL_HINT})")
            return None
        try:
            proc = RedisProcess(appendonly=appendonly, dir=dir, executable=exe).start()
        except RedisStartError as exc:
            errors.append(f"redis-server failed to start: {exc}")
            return None
        log.info("using redis-server %s (pid %s) at %s", exe, proc.pid, proc.url)
        return proc

    def embedded() -> EmbeddedRedis | None:
        try:
            emb = EmbeddedRedis().start()
        except RedisStartError as exc:
            errors.append(str(exc))
            return None
        log.info("using the embedded Redis (fakeredis, in memory) at %s", emb.url)
        if appendonly:
            log.warning("the embedded Redis keeps nothing on disk; appendonly is ignored")
        return emb

    order = (real, embedded) if prefer_real else (embedded, real)
    for attempt in order:
        started = attempt()
        if started is not None:
            if errors:
                log.warning("fell back: %s", "; ".join(errors))
            return started
    raise RedisStartError("no Redis could be started: " + "; ".join(errors))
