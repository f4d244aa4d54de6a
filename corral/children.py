"""Child processes: start one, stop it (SIGTERM, then SIGKILL after a grace period), reap it.

The scheduler runs its RQ worker through this; the demo, the Redis launcher, the
benchmarks and the chaos run start whole fleets with it. Stopping follows systemd's
``KillMode=mixed``, which Corral's units use: SIGTERM goes to the child alone, so it can
stop its own children in order (a second SIGTERM would make a Corral process or an RQ
worker skip its graceful drain, so it is sent once); when the child has exited, or the
grace period is over, whatever is left of it is SIGKILLed: its process group and the
rest of its session when it has its own.

Built on ``subprocess`` rather than mirakuru: mirakuru's executors only add to the
parent's environment (our fleets must drop the caller's ``CORRAL_*`` settings), start
children through ``preexec_fn`` (unsafe in a process with threads, which the scheduler
is), signal the whole group with the first SIGTERM, and are synchronous only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

import psutil

from corral.errors import CorralError

log = logging.getLogger(__name__)

Log = str | os.PathLike[str] | IO[bytes] | None
"""Where a child's stdout and stderr go: a file (appended to), an open file, or ours."""


class ChildExited(CorralError):
    """A child process ended while it was expected to start or to keep running."""


class Child:
    """One child process, started by the constructor (as ``subprocess.Popen`` is).

    ``own_session`` (the default) puts it in a new session and process group: a Ctrl-C
    in the terminal reaches only the parent, which then stops its children in order,
    and a kill can take everything the child started. A child that should die with the
    parent's group (the scheduler's RQ worker: a SIGKILL of the scheduler's group, as
    a crash of its host, takes it too) shares the parent's.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Log = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        own_session: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.own_session = own_session
        self._terminated = False
        self._finished = False
        self.log_path: Path | None = None
        if isinstance(log, str | os.PathLike):
            self.log_path = Path(log)
            # Appended to: a restarted child's log follows its predecessor's.
            with self.log_path.open("ab") as out:
                self.popen = self._spawn(out, env, cwd)
        else:
            self.popen = self._spawn(log, env, cwd)

    def _spawn(
        self,
        out: IO[bytes] | None,
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None,
    ) -> subprocess.Popen[bytes]:
        log.debug("starting %s: %s", self.name, " ".join(self.argv))
        return subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=None if out is None else subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=self.own_session,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Its exit code once it has exited (and been reaped), else ``None``."""
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise ``ChildExited`` (with the end of its log) if it has exited."""
        code = self.popen.poll()
        if code is not None:
            raise ChildExited(f"{self.name} exited with code {code}{self._tail_note()}")

    def wait_until(self, check: Callable[[], object], timeout: float, what: str) -> None:
        """Poll ``check`` at a short, growing interval until it is true.

        Raises ``ChildExited`` as soon as the child exits (a start that failed is not
        waited out) and ``TimeoutError`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        interval = 0.005
        while True:
            self.check_alive()
            if check():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what}: not within {timeout:g}s{self._tail_note()}")
            time.sleep(min(interval, remaining))  # a poll with a deadline
            interval = min(interval * 2, 0.1)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of its log file ("" when it has none)."""
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def _tail_note(self) -> str:
        tail = self.log_tail()
        return f"; the end of {self.log_path}:\n{tail}" if tail else ""

    def terminate(self) -> None:
        """SIGTERM to the child alone, once."""
        if not self._terminated and self.popen.poll() is None:
            self._terminated = True
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL it and what it started, as a crash of its host would; reap it."""
        if self._finished:
            return
        if self.popen.poll() is None:
            if self.own_session:
                # Not reaped yet, so its pid (and its group's id) cannot be anyone else's.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
            else:
                self.popen.kill()  # its group is ours
        self.popen.wait()
        self._finished = True
        if self.own_session:
            _kill_session(self.popen.pid)

    def stop(self, grace: float) -> int:
        """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL; returns the exit code."""
        self.terminate()
        try:
            self.popen.wait(timeout=max(grace, 0.0))
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %s) ignored SIGTERM for %gs; killing it", self.name, self.pid, grace
            )
        self.kill()  # also what it left behind in its session
        return self.popen.wait()  # reaped: returns at once

    async def stop_async(self, grace: float) -> int:
        """``stop`` for an event loop: the waiting happens in a thread."""
        return await asyncio.to_thread(self.stop, grace)

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.popen.pid} returncode={self.popen.returncode}>"


def stop_all(children: Iterable[Child], grace: float) -> None:
    """SIGTERM them all at once, give them ``grace`` seconds in total, SIGKILL the rest."""
    children = list(children)
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        child.stop(deadline - time.monotonic())


def _kill_session(sid: int) -> None:
    """SIGKILL what is left in session ``sid`` (an RQ worker whose scheduler died).

    Called right after its leader was reaped, before its pid can be handed out again.
    """
    for pid in psutil.pids():
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to signal
            if pid != sid and os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
