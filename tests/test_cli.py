"""The ``corral`` command line: clear settings errors, and flags on either side of a
command or an action."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cli import command_first


def _corral(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("command", ["gateway", "worker", "scheduler", "status"])
def test_bad_settings_are_one_line_each_and_exit_2(command: str) -> None:
    flags = [] if command == "status" else ["--node-ttl", "-1"]
    env = (
        {"CORRAL_JOB_TTL": "soon"} if flags else {"CORRAL_JOB_TTL": "soon", "CORRAL_NODE_TTL": "-1"}
    )
    done = _corral(command, *flags, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert sorted(lines) == sorted(
        [
            f"corral {command}: CORRAL_NODE_TTL (--node-ttl): "
            f"Input should be greater than 0 (got {'-1.0' if flags else repr('-1')})",
            f"corral {command}: CORRAL_JOB_TTL (--job-ttl): Input should be a valid integer, "
            "unable to parse string as an integer (got 'soon')",
        ]
    )


def test_a_bad_setting_never_prints_a_secret() -> None:
    url = "redis://admin:s3cret-pass@127.0.0.1:6379/x"
    done = _corral("status", env={"CORRAL_REDIS_URL": url, "CORRAL_NODE_TTL": "0"})
    assert done.returncode == 2
    assert "s3cret-pass" not in done.stderr


def test_python_m_forms_report_settings_errors_too() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "corral.worker.main", "--heartbeat-interval", "0"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "CORRAL_HEARTBEAT_INTERVAL (--heartbeat-interval)" in done.stderr


def test_flags_may_come_before_the_command() -> None:
    assert command_first(["--redis-url", "redis://h/1", "status", "--json"]) == [
        "status", "--redis-url", "redis://h/1", "--json",
    ]  # fmt: skip
    assert command_first(["status", "--redis-url", "u"]) == ["status", "--redis-url", "u"]
    assert command_first(["--version"]) == ["--version"]


def test_dlq_takes_its_redis_url_before_or_after_the_action(redis_url: str) -> None:
    for args in (
        ("dlq", "list", "--redis-url", redis_url),
        ("dlq", "--redis-url", redis_url, "list"),
        ("--redis-url", redis_url, "dlq", "list"),
    ):
        # A wrong URL in the environment proves the flag is the one used.
        done = _corral(*args, env={"CORRAL_REDIS_URL": "redis://127.0.0.1:1/0"})
        assert done.returncode == 0, done.stderr
        assert "dead-letter queue is empty" in done.stdout


def test_demo_without_the_ollama_client_says_which_extra_to_install(tmp_path: Path) -> None:
    # As in a plain install: the official client cannot be imported.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ollama'] = None\n")
    done = _corral("demo", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert "pip install 'corral[demo]'" in done.stderr and "Traceback" not in done.stderr
