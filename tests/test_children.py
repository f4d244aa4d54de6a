"""corral.children: start, stop (SIGTERM, then SIGKILL after a grace period) and reap."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from corral.children import Child, ChildExited, stop_all

# A child that logs each SIGTERM it gets and exits on the first (as Corral processes do).
GRACEFUL = """
import signal, sys, time
def term(*_):
    print("TERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("ready", flush=True)
time.sleep(60)
"""

# A child that logs each SIGTERM it gets and goes on (a process stuck in its drain).
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, lambda *_: print("TERM", flush=True))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

# A child that starts a grandchild in another process group of its own session, prints
# the grandchild's pid, then exits: the grandchild is left behind, orphaned.
ORPHANING = """
import subprocess, sys
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              process_group=0)
print(grandchild.pid, flush=True)
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ready(child: Child) -> bool:
    return "ready" in child.log_tail()


def test_stop_sends_sigterm_once_and_reaps(tmp_path: Path) -> None:
    child = Child("graceful", python(GRACEFUL), log=tmp_path / "graceful.log")
    child.wait_until(lambda: ready(child), 10, "graceful child")
    child.terminate()  # as stop_all does first
    assert child.stop(10) == 0
    assert not child.alive
    assert child.log_tail().count("TERM") == 1  # a second SIGTERM would skip a drain
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # reaped: no zombie of ours is left


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    child = Child("stubborn", python(STUBBORN), log=tmp_path / "stubborn.log")
    child.wait_until(lambda: ready(child), 10, "stubborn child")
    started = time.monotonic()
    assert child.stop(0.5) == -signal.SIGKILL
    took = time.monotonic() - started
    assert 0.5 <= took < 8
    assert child.log_tail().count("TERM") == 1


def test_kill_takes_what_the_child_left_in_its_session(tmp_path: Path) -> None:
    child = Child("orphaning", python(ORPHANING), log=tmp_path / "orphaning.log")
    assert child.popen.wait(10) == 0  # it has printed the grandchild's pid and exited
    grandchild = int(child.log_tail().strip())
    try:
        assert alive(grandchild)
        child.kill()  # the child itself has exited: only the rest of its session is left
        deadline = time.monotonic() + 5
        while alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.01)  # SIGKILLed; init reaps it
        assert not alive(grandchild)
    finally:
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_a_child_in_our_group_is_killed_alone(tmp_path: Path) -> None:
    child = Child("same-group", python(STUBBORN), log=tmp_path / "g.log", own_session=False)
    assert os.getpgid(child.pid) == os.getpgid(0)
    child.wait_until(lambda: ready(child), 10, "child in our group")
    child.kill()  # a killpg here would take the test runner with it
    assert child.returncode == -signal.SIGKILL


def test_stop_all_shares_one_grace_period(tmp_path: Path) -> None:
    children = [Child(f"s{i}", python(STUBBORN), log=tmp_path / f"s{i}.log") for i in range(3)]
    for child in children:
        child.wait_until(lambda child=child: ready(child), 10, child.name)
    started = time.monotonic()
    stop_all(children, 0.5)
    assert time.monotonic() - started < 5  # 0.5 s for all of them, not 0.5 s each in turn
    assert [c.returncode for c in children] == [-signal.SIGKILL] * 3
    assert all(c.log_tail().count("TERM") == 1 for c in children)


def test_wait_until_fails_fast_when_the_child_exits(tmp_path: Path) -> None:
    child = Child("crasher", python("print('boom'); raise SystemExit(3)"), log=tmp_path / "c.log")
    started = time.monotonic()
    with pytest.raises(ChildExited, match=r"code 3(.|\n)*boom"):
        child.wait_until(lambda: False, 30, "a check that never passes")
    assert time.monotonic() - started < 10


def test_wait_until_times_out(tmp_path: Path) -> None:
    child = Child("sleeper", python(STUBBORN), log=tmp_path / "t.log")
    try:
        with pytest.raises(TimeoutError, match="never"):
            child.wait_until(lambda: False, 0.2, "never")
    finally:
        child.kill()


def test_log_is_appended_across_incarnations(tmp_path: Path) -> None:
    log = tmp_path / "again.log"
    for word in ("first", "second"):
        child = Child("again", python(f"print({word!r})"), log=log)
        assert child.popen.wait(10) == 0
    assert log.read_text().split() == ["first", "second"]


def test_env_is_the_one_given(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "ONLY_THIS": "1"}
    code = "import os; print(sorted(k for k in os.environ if k in ('ONLY_THIS', 'HOME')))"
    child = Child("env", python(code), log=tmp_path / "env.log", env=env)
    assert child.popen.wait(10) == 0
    assert child.log_tail().strip() == "['ONLY_THIS']"


async def test_stop_async_leaves_the_event_loop_running(tmp_path: Path) -> None:
    child = Child("stubborn", python(STUBBORN), log=tmp_path / "a.log")
    await asyncio.to_thread(child.wait_until, lambda: ready(child), 10, "stubborn child")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        assert await child.stop_async(0.5) == -signal.SIGKILL
    finally:
        ticker.cancel()
    assert ticks >= 10  # the loop kept running through the 0.5 s grace period
