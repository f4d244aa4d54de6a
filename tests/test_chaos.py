"""The chaos run, CI-sized (``bench/chaos.py --short``): kill workers, the gateway, the active
scheduler and Redis, and inject the faults of ``bench/faults.py`` (Redis refusing writes,
Redis stalled, garbage answers, a slow ``/api/ps``, a stopped worker removed from the
registry, skewed worker clocks, killed pub/sub connections) while jobs flow, then account
for every job.

It starts its own processes and Redis and takes about a minute and a half; deselect it
with ``-m "not chaos"``.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_LIMIT_S = 200


@pytest.mark.chaos
@pytest.mark.timeout(RUN_LIMIT_S + 40)
def test_chaos_short_loses_duplicates_and_reruns_nothing(tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    command = [sys.executable, str(ROOT / "bench" / "chaos.py"), "--short", "--json", str(report)]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as run:
        try:
            out, err = run.communicate(timeout=RUN_LIMIT_S)
        except subprocess.TimeoutExpired:
            run.terminate()  # SIGTERM: chaos.py stops every process it started
            out, err = run.communicate(timeout=20)
            pytest.fail(
                f"bench/chaos.py --short ran past {RUN_LIMIT_S} s; output:\n{(out + err)[-6000:]}"
            )
    summary = out[out.find("== chaos result ==") :][-30000:] + err[-3000:]
    where = f"{summary}\n(full report: {report})"
    assert report.exists(), where
    result = json.loads(report.read_text())
    # Every disruption is on in --short, and each one must have happened at least once.
    assert sorted(result["enabled"]) == sorted(result["injected"]), where
    assert {k: n for k, n in result["injected"].items() if n < 1} == {}, where
    last = out.strip().splitlines()[-1] if out.strip() else ""
    assert re.match(r"lost=0 answered_twice=0 ran_twice=0 wrong=0 ", last), where
    assert run.returncode == 0, where


# -- how the report sorts the jobs that ran twice (bench/fault_report.py) -------------------


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("fault_report")


def twice(report: Any, first_chunk_at: float | None = None) -> Any:
    """A job started on n1 at 9.5 s and again on n2 at 11 s, completed on both."""
    runs = [report.NodeRun("n1", [9.5], [10.0], []), report.NodeRun("n2", [11.0], [12.0], [])]
    return report.JobView(0, "j", "stream", 9.4, 12.1, first_chunk_at, runs)


def test_ran_twice_is_a_target_miss_unless_streamed_or_its_worker_was_gone(report: Any) -> None:
    from faults import Disruption

    slow_ps = Disruption("slow_ps", 8.0, 20.0, node="n1")
    assert report.ran_twice(twice(report), [slow_ps])[0] == "target"
    # The client had its first chunk before the disruption that hit the job: allowed.
    pubsub = Disruption("pubsub_kill", 10.5, 10.5)
    assert report.ran_twice(twice(report, first_chunk_at=9.6), [pubsub])[0] == "streamed"
    assert report.ran_twice(twice(report, first_chunk_at=10.6), [pubsub])[0] == "target"
    # The first completion went out while its worker was stopped: allowed.
    stop = Disruption("worker_stop", 9.8, 17.8, node="n1", jobs=["j"])
    assert report.ran_twice(twice(report), [stop])[0] == "worker_gone"
    once = report.JobView(1, "k", "single", 1.0, 2.0, None, [report.NodeRun("n1", [1], [2], [])])
    assert report.ran_twice(once, [slow_ps]) is None


def test_a_completion_its_worker_could_not_record_before_it_was_killed_is_allowed(
    report: Any,
) -> None:
    """Finished at 10 s while Redis was stalled (9.9 to 10.6 s); the worker is killed at
    10.7 s, before its backed-off write could go through: nobody could record it."""
    from faults import Disruption

    stall = Disruption("redis_stall", 9.9, 10.6)
    soon = Disruption("worker_kill", 10.7, 10.7, node="n1")
    assert report.ran_twice(twice(report), [stall, soon])[0] == "worker_gone"
    # Redis back for longer than RECORD_S before the kill: the worker could have recorded it.
    earlier = Disruption("redis_stall", 5.0, 10.7 - report.RECORD_S - 0.1)
    assert report.ran_twice(twice(report), [earlier, soon])[0] == "target"


def test_a_disruption_hits_only_the_jobs_it_reached(report: Any) -> None:
    from faults import Disruption

    job = report.JobView(0, "j", "single", 5.0, 9.0, None, [report.NodeRun("n1", [5.5], [], [6.0])])
    assert report.hit_time(Disruption("garbage", 4.0, 8.0, node="n1"), job) == 6.0
    assert report.hit_time(Disruption("garbage", 30.0, 40.0, node="n1"), job) is None
    assert report.hit_time(Disruption("garbage", 4.0, 8.0, node="n2"), job) is None
    # A kill that could read what its worker held hits exactly those jobs.
    assert report.hit_time(Disruption("worker_kill", 6.0, 7.0, node="n1", jobs=[]), job) is None
    assert report.hit_time(Disruption("worker_kill", 6.0, 7.0, node="n1", jobs=["j"]), job) == 6.0
    # A global one hits what was in flight; a node's own only what ran there.
    assert report.hit_time(Disruption("redis_stall", 8.0, 20.0), job) == 8.0
    assert report.hit_time(Disruption("redis_stall", 12.0, 20.0), job) is None
    assert report.hit_time(Disruption("slow_ps", 3.0, 6.0, node="n2"), job) is None
