"""The chaos run, CI-sized: kill workers, the gateway, the active scheduler and Redis while
jobs flow, then account for every job (``bench/chaos.py --short``).

It starts its own processes and Redis and takes one to two minutes; deselect it with
``-m "not chaos"``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.chaos
@pytest.mark.timeout(170)
def test_chaos_short_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    command = [sys.executable, str(ROOT / "bench" / "chaos.py"), "--short", "--json", str(report)]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as run:
        try:
            out, err = run.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            run.terminate()  # SIGTERM: chaos.py stops every process it started
            out, err = run.communicate(timeout=15)
            pytest.fail(f"bench/chaos.py --short ran past 150 s; output:\n{(out + err)[-6000:]}")
    summary = out[out.find("== chaos result ==") :][-30000:] + err[-3000:]
    lines = out.strip().splitlines()
    last = lines[-1] if lines else ""
    assert re.match(r"lost=0 duplicated=0 ", last), f"{summary}\n(full report: {report})"
    assert run.returncode == 0, f"{summary}\n(full report: {report})"
