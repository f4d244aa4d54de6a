"""What degradation levels and wait admission cost a request at level 0, in process.

The end-to-end overhead benchmark (``bench_overhead.py``) cannot resolve a fraction of a
microsecond on a shared 2-core machine, so this times exactly the code a level-0 request
runs in ``make_spec`` for them (one attribute test and ``degrade.admit``), against an
empty call, with ``timeit`` (best of 5 runs of 1,000,000 calls).

    python bench/level0_cost.py
"""

from __future__ import annotations

import timeit
import types

from corral.gateway import degrade
from corral.load import NO_LOAD, LoadReport, ModelLoad
from corral.settings import GatewaySettings

MODEL = "llama3:latest"
CALLS = 1_000_000


def main() -> int:
    settings = GatewaySettings()
    measured = LoadReport(at=1.0, ttl=10, rate=4.0, models={MODEL: ModelLoad(4.0)})
    view = types.SimpleNamespace(level=0, load=NO_LOAD)

    def empty(limit: float | None) -> None:
        pass

    def level0(limit: float | None) -> None:
        if view.level:
            raise AssertionError("level 0 expected")
        degrade.admit(view.load, MODEL, 5, limit, settings)

    cases = [
        ("empty call (reference)", empty, None, NO_LOAD),
        ("level 0, no timeout", level0, None, NO_LOAD),
        ("level 0, X-Corral-Timeout, no report", level0, 10.0, NO_LOAD),
        ("level 0, X-Corral-Timeout, measured drain rate", level0, 10.0, measured),
    ]
    for name, fn, limit, load in cases:
        view.load = load
        best = min(timeit.repeat(lambda f=fn, x=limit: f(x), number=CALLS, repeat=5))
        print(f"{name}: {best / CALLS * 1e9:.0f} ns per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
